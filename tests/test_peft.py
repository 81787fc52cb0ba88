"""PEFT (LoRA) students and LoRA teacher checkpoints, on the Hugging Face path and TinyLLaVA.

A LoRA student's step is checked against the merged model's by the chain rule: with the merged
weight W + s*B@A and its SGD step dW, the adapters must step by dA = s * B^T @ dW and
dB = s * dW @ A^T (one SGD step, same batch, same teacher).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from switchkd_plugin.testing import make_host_batch
from switchkd_plugin.testing.trainer import assert_same_step, make_trainer
from switchkd_plugin.training.teacher import load_teacher

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[peft]')")

R, ALPHA = 4, 8
SCALE = ALPHA / R
LR = 0.5  # test_trainer's SGD learning rate


def _lora_config(**overrides) -> peft.LoraConfig:
    # q_proj / v_proj: the attention of the Qwen2 LM and of the SigLIP vision encoder alike.
    options = dict(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.LoraConfig(**{**options, **overrides})


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _in(component: str, name: str) -> bool:
    """Whether parameter/module ``name`` lies in ``component`` (e.g. ``vision_tower``)."""
    return component in name.split(".")


def _lora_layers(state: dict[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Base-model module name -> (its lora_A, its lora_B parameter names)."""
    layers = {}
    for name in state:
        if ".lora_A." in name:
            module = name.removeprefix("base_model.model.").split(".lora_A.")[0]
            layers[module] = (name, name.replace(".lora_A.", ".lora_B."))
    return layers


def test_peft_student_takes_the_merged_models_step(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=3, seed=0)]
    torch.manual_seed(0)  # random A and B: the merged weights differ from the base
    config = _lora_config(init_lora_weights=False)
    trainer = make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path / "peft",
                       teacher=hf_teacher, peft_config=config)  # fmt: skip
    student = trainer.model
    assert isinstance(student, peft.PeftModel)
    merged = copy.deepcopy(student).merge_and_unload().requires_grad_(True)
    before, merged_before = _state(student), _state(merged)
    trainer.train()
    make_trainer(merged, tiny_tokenizer, batches, tmp_path / "merged", teacher=hf_teacher).train()
    after, merged_after = _state(student), _state(merged)

    layers = _lora_layers(before)
    assert any(_in("vision_tower", m) for m in layers)
    assert any(_in("language_model", m) for m in layers)
    expected = {}
    for module, (a_name, b_name) in layers.items():
        a, b = before[a_name], before[b_name]
        merged_step = merged_after[f"{module}.weight"] - merged_before[f"{module}.weight"]
        expected[a_name] = a + SCALE * b.T @ merged_step
        expected[b_name] = b + SCALE * merged_step @ a.T
    assert_same_step(after, expected, {name: before[name] for name in expected})
    for name, start in before.items():
        if name not in expected:  # base weights stay frozen
            assert torch.equal(after[name], start), name


def test_gradient_checkpointing_gives_the_same_lora_step(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    """Checkpointed decoder and vision layers: the adapters inside them still get the gradient."""
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=3, seed=2)]
    states = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        trainer = make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, batches,
                           tmp_path / str(checkpointing), teacher=hf_teacher,
                           peft_config=_lora_config(init_lora_weights=False),
                           training={"gradient_checkpointing": checkpointing})  # fmt: skip
        before = _state(trainer.model)
        trainer.train()
        states.append(_state(trainer.model))
    lora = {name: value for name, value in before.items() if "lora_" in name}
    assert_same_step(states[1], states[0], lora)


def test_vsd_alone_moves_only_the_vision_encoders_lora_weights(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    student = peft.get_peft_model(copy.deepcopy(hf_student), _lora_config())  # a PeftModel
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=1)]
    before = _state(student)
    make_trainer(student, tiny_tokenizer, batches, tmp_path, teacher=hf_teacher, w_ce=0.0,
             w_align=0.0).train()  # fmt: skip
    moved = {
        name for name, value in _state(student).items() if not torch.equal(value, before[name])
    }
    assert moved, "the switch term's gradient did not reach the vision encoder's LoRA weights"
    outside = sorted(n for n in moved if "lora_" not in n or not _in("vision_tower", n))
    assert not outside, f"VSD alone moved {outside[:3]}"


def test_peft_config_with_a_peft_model_is_refused(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    student = peft.get_peft_model(copy.deepcopy(hf_student), _lora_config())
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2)]
    with pytest.raises(ValueError, match="already a PeftModel"):
        make_trainer(student, tiny_tokenizer, batches, tmp_path, teacher=hf_teacher,
                 peft_config=_lora_config())  # fmt: skip


def test_peft_config_with_a_model_id_is_refused_naming_the_fix(tmp_path):
    """TRL's trainers take a model id and load it themselves; the adapters must wrap the
    student before the Trainer sees it."""
    from switchkd_plugin import SwitchKDTrainer

    with pytest.raises(ValueError, match=r"model='Qwen/x'.*load the model first"):
        SwitchKDTrainer(model="Qwen/x", peft_config=_lora_config())


def test_hf_lora_teacher_directory_loads_merged(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    """A PEFT adapter directory over a saved base model: --teacher_model_path loads it merged,
    W + s*B@A, and the trainer finds the tokenizer beside the base."""
    base_dir, adapter_dir = tmp_path / "teacher-base", tmp_path / "teacher-lora"
    hf_teacher.save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    base = type(hf_teacher).from_pretrained(base_dir)  # name_or_path: where the adapters point
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, _lora_config(init_lora_weights=False))
    lora.save_pretrained(adapter_dir)
    adapters = _state(lora)

    teacher = load_teacher(str(adapter_dir), type(hf_teacher), torch.float32, "eager")
    assert not isinstance(teacher, peft.PeftModel)
    merged, base_state = teacher.state_dict(), hf_teacher.state_dict()
    layers = _lora_layers(adapters)
    for name, weight in base_state.items():
        module = name.removesuffix(".weight")
        if module in layers:
            a, b = (adapters[n] for n in layers[module])
            weight = weight + SCALE * b @ a
        torch.testing.assert_close(merged[name], weight, rtol=1e-5, atol=1e-6, msg=name)

    trainer = make_trainer(copy.deepcopy(hf_student), tiny_tokenizer,
                       [make_host_batch(hf_student, tiny_tokenizer)], tmp_path / "run",
                       teacher_model_path=str(adapter_dir))  # fmt: skip
    for name, value in trainer.teacher.state_dict().items():
        torch.testing.assert_close(value, merged[name], rtol=0, atol=0, msg=name)


def test_hf_lora_teacher_without_a_base_is_refused(hf_teacher, tmp_path):
    lora = peft.get_peft_model(copy.deepcopy(hf_teacher), _lora_config())  # built, not loaded
    lora.save_pretrained(tmp_path / "teacher-lora")
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_teacher(str(tmp_path / "teacher-lora"), type(hf_teacher), torch.float32, "eager")


def test_hf_lora_teacher_over_a_missing_base_names_its_adapter_config(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    """--teacher_model_path names the adapters; the base that their adapter_config.json points
    at is gone (e.g. trained on another machine): the error names that file's field and value."""
    adapter_dir = tmp_path / "teacher-lora"
    peft.get_peft_model(copy.deepcopy(hf_teacher), _lora_config()).save_pretrained(adapter_dir)
    tiny_tokenizer.save_pretrained(adapter_dir)
    adapter_config = adapter_dir / "adapter_config.json"
    fields = json.loads(adapter_config.read_text())
    adapter_config.write_text(json.dumps({**fields, "base_model_name_or_path": "/nonexistent/b"}))
    with pytest.raises(FileNotFoundError) as refused:
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, [], tmp_path / "run",
                 teacher_model_path=str(adapter_dir))  # fmt: skip
    message = str(refused.value)
    assert message.startswith(f"--teacher_model_path {adapter_dir} holds LoRA adapters"), message
    assert f"base_model_name_or_path in {adapter_config}, is '/nonexistent/b': no such" in message
    assert "Edit base_model_name_or_path" in message and "pass the merged teacher" in message
