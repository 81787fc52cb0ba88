"""The demo's hosts: ``host_for`` resolution, and the TinyLLaVA Factory host (the Factory's model,
data pipeline, collator, template and ``LLaVATrainer``) on its own and end to end.

The Factory tests skip, saying why, where the Factory cannot be imported (see conftest.py); the
missing-Factory tests run only there, as nothing is faked.
"""

from __future__ import annotations

import dataclasses
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.demo.config import SMOKE_CONFIG, TrainSchedule
from switchkd_plugin.demo.evaluation import OVERALL, greedy_decode
from switchkd_plugin.demo.hosts import (
    HOSTS,
    FactoryShapesDataset,
    HFLlavaHost,
    TinyLlavaHost,
    host_for,
)
from switchkd_plugin.demo.pipeline import prepare, run_default
from switchkd_plugin.demo.shapes import (
    QUESTION_TYPES,
    LlavaDatasetPaths,
    ShapesTaskConfig,
    write_llava_dataset,
)
from switchkd_plugin.demo.students import train_student
from switchkd_plugin.integrations.tinyllava.compat import factory_import_error
from switchkd_plugin.testing import (
    FACTORY_IMAGE_TOKEN_INDEX,
    IGNORE_INDEX,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing.tiny_models import EOS_TOKEN, SYSTEM_PROMPT

SMALL = ShapesTaskConfig(num_train=16, num_val=0, num_test=16, seed=5)


needs_no_factory = pytest.mark.skipif(
    factory_import_error() is None, reason="TinyLLaVA Factory is importable here"
)


@pytest.fixture(scope="module")
def host(tinyllava_factory: types.ModuleType) -> TinyLlavaHost:
    return TinyLlavaHost()


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory: pytest.TempPathFactory) -> LlavaDatasetPaths:
    return write_llava_dataset(SMALL, tmp_path_factory.mktemp("shapes") / "data")


@pytest.fixture(scope="module")
def student(host: TinyLlavaHost, tiny_tokenizer) -> nn.Module:
    return host.build(student_spec(), tiny_tokenizer).eval()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# ------------------------------------------------------------------------------ resolution


def test_hf_llava_and_unknown_hosts() -> None:
    assert isinstance(host_for("hf_llava", system_prompt=True), HFLlavaHost)
    assert host_for("hf_llava", system_prompt=True).system_prompt
    with pytest.raises(ValueError, match="unknown host 'llava'"):
        host_for("llava")
    assert set(HOSTS) == {"auto", "hf_llava", "tinyllava"}


def test_auto_and_tinyllava_are_the_factory_when_importable(
    tinyllava_factory: types.ModuleType,
) -> None:
    for name in ("auto", "tinyllava"):
        host = host_for(name, system_prompt=True)
        assert isinstance(host, TinyLlavaHost) and host.system_prompt
        assert host.name == "tinyllava"
    assert "TinyLLaVA Factory path" in host.label and "LLaVATrainer" in host.label


@needs_no_factory
def test_without_the_factory_auto_is_hf_llava_and_tinyllava_says_how_to_fix() -> None:
    assert isinstance(host_for("auto"), HFLlavaHost)
    with pytest.raises(ImportError, match="TinyLLaVA Factory") as error:
        host_for("tinyllava")
    assert "PYTHONPATH" in str(error.value) and "docs/tinyllava.md" in str(error.value)


@needs_no_factory
def test_auto_says_why_when_a_factory_on_the_path_does_not_import(tmp_path, monkeypatch) -> None:
    broken = tmp_path / "tinyllava"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('needs a package this env lacks')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="does not import .*needs a package this env lacks"):
        assert isinstance(host_for("auto"), HFLlavaHost)


# ---------------------------------------------------------------------------------- models


def test_same_spec_and_seed_build_the_same_model(host: TinyLlavaHost, tiny_tokenizer) -> None:
    torch.manual_seed(1)
    first = host.build(student_spec(), tiny_tokenizer)
    torch.manual_seed(2)  # the caller's RNG state does not matter
    assert _same_weights(first, host.build(student_spec(), tiny_tokenizer))
    other = host.build(dataclasses.replace(student_spec(), seed=7), tiny_tokenizer)
    for module in ("connector", "language_model", "vision_tower"):
        weights = [dict(model.get_submodule(module).named_parameters()) for model in (first, other)]
        assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), module
    assert all(p.requires_grad for p in first.parameters())  # the demo trains everything
    assert first.config.tokenizer_padding_side == "left"


def test_state_dict_round_trip_and_vision_copy(
    host: TinyLlavaHost, tiny_tokenizer, tmp_path: Path
) -> None:
    """What the pipeline does with the teacher's cache and the shared vision weights."""
    spec = teacher_spec(vision_feature_layer=-1)
    teacher = host.build(spec, tiny_tokenizer)
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.add_(0.01)  # no longer the fresh init
    torch.save(teacher.state_dict(), tmp_path / "model.pt")
    rebuilt = host.build(spec, tiny_tokenizer)
    rebuilt.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    assert _same_weights(teacher, rebuilt)

    student = host.build(student_spec(vision_layers=3, vision_feature_layer=-1), tiny_tokenizer)
    target = adapter_for(student)
    target.vision_module.load_state_dict(adapter_for(teacher).vision_module.state_dict())
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        target.encode_vision(images), adapter_for(teacher).encode_vision(images)
    )
    assert target.encode_vision(images).shape == (2, 16, 32)  # every SigLIP patch


# ------------------------------------------------------------------------------------ data


@pytest.mark.parametrize("system_prompt", [False, True])
def test_factory_dataset_supervises_the_answer_after_the_generation_prompt(
    student: nn.Module, tiny_tokenizer, shapes_data: LlavaDatasetPaths, system_prompt: bool
) -> None:
    host = TinyLlavaHost(system_prompt=system_prompt)
    dataset = host.dataset(student, tiny_tokenizer, shapes_data, "train")
    assert isinstance(dataset, FactoryShapesDataset) and len(dataset) == SMALL.num_train
    assert dataset.tokenizer is student.tokenizer  # the tokenizer the Factory loaded
    system = tiny_tokenizer(SYSTEM_PROMPT).input_ids
    for i in range(len(dataset)):
        item, prompt = dataset[i], dataset.generation_inputs(i)
        ids, labels = item["input_ids"], item["labels"]
        answer = labels[labels != IGNORE_INDEX].tolist()
        assert dataset.tokenizer.decode(answer) == f" {dataset.answer(i)}{EOS_TOKEN}"
        assert answer == tiny_tokenizer(f" {dataset.answer(i)}{EOS_TOKEN}").input_ids
        # The generation prompt is exactly the unsupervised part before the answer.
        n = len(prompt["input_ids"])
        assert ids[:n].equal(prompt["input_ids"]) and n + len(answer) == len(ids)
        assert (labels[:n] == IGNORE_INDEX).all()
        assert (ids == FACTORY_IMAGE_TOKEN_INDEX).sum() == 1
        assert (ids[: len(system)].tolist() == system) == system_prompt
        assert prompt["images"].equal(item["image"]) and item["image"].shape == (3, 32, 32)
        assert dataset.question_type(i) in QUESTION_TYPES

    batch = host.collator(tiny_tokenizer)([dataset[i] for i in range(4)])
    assert set(batch) == {"input_ids", "labels", "attention_mask", "images"}
    with torch.no_grad():
        assert torch.isfinite(student(**batch).loss)


def test_batched_greedy_answers_equal_single_prompt_answers(
    host: TinyLlavaHost, student: nn.Module, tiny_tokenizer, shapes_data: LlavaDatasetPaths
) -> None:
    dataset = host.dataset(student, tiny_tokenizer, shapes_data, "test")
    indices = list(range(len(dataset)))
    prompts = host.prompts(dataset, indices)
    lengths = prompts["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1  # rows of several lengths, so some are padded
    assert (
        prompts["input_ids"][prompts["attention_mask"] == 0] == tiny_tokenizer.pad_token_id
    ).all()
    assert prompts["attention_mask"][:, -1].all()  # left-padded
    eos = tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    singles = [greedy_decode(student, host.prompts(dataset, [i]), eos, 3)[0] for i in indices]
    assert greedy_decode(student, prompts, eos, 3) == singles

    with torch.no_grad():
        batched = student(**prompts).logits[:, -1]
        alone = torch.cat([student(**host.prompts(dataset, [i])).logits[:, -1] for i in indices])
    torch.testing.assert_close(batched, alone, atol=1e-4, rtol=1e-4)
    # What left padding guards against: re-padded on the right, a short row's last position is
    # padding.
    student.config.tokenizer_padding_side = "right"
    try:
        with torch.no_grad():
            right = student(**prompts).logits[:, -1]
    finally:
        student.config.tokenizer_padding_side = "left"
    shorter = lengths < lengths.max()
    assert not torch.allclose(right[shorter], alone[shorter], atol=1e-2)


# -------------------------------------------------------------------------------- training


def test_factory_trainer_optimises_as_the_hf_host(
    host: TinyLlavaHost, tiny_tokenizer, tmp_path: Path
) -> None:
    """Same optimizer, parameter groups, learning rate and weight decay as transformers'
    Trainer: the Factory's extra arguments (mm_projector_lr, group_by_modality_length) are off."""
    from tinyllava.train.tinyllava_trainer import LLaVATrainer
    from tinyllava.utils.arguments import TrainingArguments

    assert host.training_arguments_class() is TrainingArguments
    assert issubclass(host.trainer_class(), LLaVATrainer)
    optimizers = []
    for demo_host in (HFLlavaHost(), host):
        args = demo_host.training_arguments_class()(
            output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.0, use_cpu=True,
            report_to=[], max_steps=1, save_strategy="no", remove_unused_columns=False,
        )  # fmt: skip
        trainer = demo_host.trainer_class()(
            model=demo_host.build(student_spec(), tiny_tokenizer),
            args=args,
            switchkd_args=SwitchKDArguments(),
        )
        optimizers.append(trainer.create_optimizer())
    hf, factory = optimizers
    assert type(factory) is type(hf) is torch.optim.AdamW
    # transformers >= 5 defaults to AdamW's fused kernel, the Factory pins optim="adamw_torch":
    # the same update, another kernel.
    assert {k: v for k, v in factory.defaults.items() if k != "fused"} == {
        k: v for k, v in hf.defaults.items() if k != "fused"
    }
    # (parameters, lr, weight decay) per group; transformers 5 lists its groups in another order.
    groups = [
        sorted((len(g["params"]), g["lr"], g["weight_decay"]) for g in o.param_groups)
        for o in optimizers
    ]
    assert groups[0] == groups[1]
    assert {(lr, decay) for _, lr, decay in groups[1]} == {(1e-3, 0.0)}


def test_demo_runs_end_to_end_on_the_factory(
    host: TinyLlavaHost, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = dataclasses.replace(
        SMOKE_CONFIG,
        host="tinyllava",
        task=dataclasses.replace(SMALL, num_train=48, num_test=32),
        teacher_schedule=TrainSchedule(steps=4, learning_rate=1e-3, batch_size=8),
        student_schedule=TrainSchedule(steps=2, learning_rate=1e-3, batch_size=8, logging_steps=1),
        eval_batch_size=16,
    )
    rows = run_default(config, tmp_path)
    assert host.label in capsys.readouterr().out
    assert list(rows) == ["teacher", "SFT student", "Switch-KD student", "chance"]
    for accuracy in rows.values():
        assert set(accuracy) == {*QUESTION_TYPES, OVERALL}
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())

    # The cached teacher is rebuilt and loaded strictly.
    assert isinstance(prepare(config, tmp_path).host, TinyLlavaHost)
    assert "reusing the cached one" in capsys.readouterr().out


def test_the_onpolicy_variant_trains_on_the_factory(host: TinyLlavaHost, tmp_path: Path) -> None:
    """The Factory's collator right-pads (as on-policy batches need) and ``LLaVATrainer``
    generates with the Factory's model: the variant trains and logs its on-policy batches."""
    config = dataclasses.replace(
        SMOKE_CONFIG,
        host="tinyllava",
        task=dataclasses.replace(SMALL, num_train=48, num_test=32),
        vision_schedule=TrainSchedule(steps=2, learning_rate=1e-3, batch_size=16),
        teacher_schedule=TrainSchedule(steps=2, learning_rate=1e-3, batch_size=8),
        student_schedule=TrainSchedule(steps=6, learning_rate=1e-3, batch_size=8, logging_steps=2),
    )
    trained = train_student(prepare(config, tmp_path), "switchkd_onpolicy", seed=0)
    onpolicy = sum(entry["onpolicy_batches"] for entry in trained.log)
    assert 0 < onpolicy < 6 and all("vsd" in entry for entry in trained.log)
