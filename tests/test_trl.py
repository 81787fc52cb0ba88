"""Switch-KD on TRL's SFTTrainer, through TRL's own VLM data path, and the Qwen2.5-VL example
end to end, on tiny offline models saved to disk and a processor built offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from switchkd_plugin.testing.tensor_close import assert_close
from switchkd_plugin.testing.trainer import assert_same_step

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip(
        f"transformers {transformers.__version__} has no Qwen2_5_VLForConditionalGeneration",
        allow_module_level=True,
    )

from switchkd_plugin.adapters import adapter_for  # noqa: E402
from switchkd_plugin.testing import qwen_vl as qwen  # noqa: E402
from switchkd_plugin.testing import student_spec, teacher_spec  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "distill_qwen2_5_vl.py"
FSDP_WORKER = Path(__file__).with_name("_fsdp_trl_worker.py")


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("distill_qwen2_5_vl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module", params=qwen.FAMILIES)
def workdir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """Tiny 'teacher' and 'student' checkpoints of one line (shared ViT weights), the teacher's
    tokenizer beside it, and a prompt-completion dataset with images in TRL's vision format."""
    import datasets

    family = request.param
    root = tmp_path_factory.mktemp(family)
    tokenizer = qwen.build_qwen_vl_tokenizer()
    qwen.build_qwen_vl(family, student_spec(), tokenizer).save_pretrained(root / "student")
    qwen.build_qwen_vl(family, teacher_spec(), tokenizer).save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    questions = ["what colour is the circle?", "how many shapes can you see?"] * 3
    answers = [" ".join(["the red circle is on the left."] * (i + 1)) for i in range(6)]
    datasets.Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
                for q in questions
            ],
            "completion": [
                [{"role": "assistant", "content": [{"type": "text", "text": a}]}] for a in answers
            ],
            "images": [[image] for image in qwen.make_images(6)],
        }
    ).save_to_disk(root / "data")
    return family, root


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--student_model_path", str(root / "student")),
        *("--teacher_model_path", str(root / "teacher")),
        *("--dataset_path", str(root / "data")),
        *("--output_dir", str(out)),
        *("--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--seed", "0"),
        *("--use_cpu", "True", "--report_to", "none", "--save_strategy", "no"),
        *("--logging_steps", "1", "--disable_tqdm", "True"),
        *extra,
    ]


def _processor(family: str):
    return qwen.build_processor(family, qwen.build_qwen_vl_tokenizer())


def test_trl_collated_batches_give_the_hosts_loss(example, workdir, tmp_path):
    """A batch from TRL's processor-based collator: the engine's CE is the host's own loss."""
    family, root = workdir
    trainer = example.build_trainer(
        _argv(root, tmp_path, "--w_align", "0", "--w_vsd", "0"), _processor(family)
    )
    collator = trainer.data_collator
    assert isinstance(collator, trl.trainer.sft_trainer.DataCollatorForVisionLanguageModeling)
    batch = collator([trainer.train_dataset[i] for i in range(3)])
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(batch)
    student = trainer.model
    with torch.no_grad():
        terms = trainer._engine(dict(batch))
        host = student(**batch).loss
    assert_close(terms.loss / terms.response_tokens, host, terms=terms.response_tokens, name="loss")


def test_example_distils_through_sft_trainer(example, workdir, tmp_path):
    """The example end to end: every term logged, the VSD term 0 at the first step (student and
    teacher start from the shared ViT) and > 0 once the student's ViT has moved; the teacher
    untouched; the saved student and processor reload."""
    family, root = workdir
    out = tmp_path / "run"
    trainer = example.main(_argv(root, out, "--max_steps", "4"), _processor(family))
    assert type(trainer).__mro__[2] is trl.SFTTrainer
    logs = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert len(logs) == 4 and all(key in logs[0] for key in ("ce", "align", "vsd", "total"))
    assert abs(logs[0]["vsd"]) < 1e-6 < logs[-1]["vsd"]
    model_class = type(trainer.model)
    saved_teacher = model_class.from_pretrained(root / "teacher")
    teacher_state = trainer.teacher.state_dict()
    for name, value in saved_teacher.state_dict().items():  # in the training dtype (TRL: bf16)
        assert torch.equal(teacher_state[name], value.to(teacher_state[name].dtype)), name
    reloaded = model_class.from_pretrained(out)
    assert adapter_for(reloaded).vision_output_width == 32
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name]), name
    assert (out / "processor_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.get_vocab() == trainer.processing_class.tokenizer.get_vocab()


def test_onpolicy_through_sft_trainer(example, workdir, tmp_path):
    """`--lmbda 1` on SFTTrainer's own VLM batches: every micro-batch generated (greedy) from
    TRL's collated prompts and trained, the count logged."""
    family, root = workdir
    argv = _argv(root, tmp_path / "run", "--max_steps", "2", "--lmbda", "1")
    argv += ["--generation_temperature", "0", "--max_new_tokens", "4"]
    trainer = example.main(argv, _processor(family))
    logs = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert [entry["onpolicy_batches"] for entry in logs] == [1, 1]


def test_trls_gkd_trainer_is_refused_by_name():
    """GKDTrainer generates and scores its own mix: refused, naming what does it with the
    visual switch (DistillationTrainer itself: tests/test_trl_distillation.py)."""
    import importlib

    from switchkd_plugin import switchkd_trainer_class

    try:
        host = importlib.import_module("trl.experimental.gkd").GKDTrainer
    except (ImportError, AttributeError):
        pytest.skip(f"trl {trl.__version__} has no trl.experimental.gkd.GKDTrainer")

    with pytest.raises(NotImplementedError, match=r"trl\.GKDTrainer is not supported .* --lmbda"):
        switchkd_trainer_class(host)(switchkd_args=None)


def test_sft_trainer_under_fsdp2_takes_the_one_rank_step(example, workdir, tmp_path):
    """The example on 2 ranks under the Trainer's FSDP2 flags (`--fsdp "full_shard auto_wrap"
    --fsdp_config` with fsdp_version 2; the student sharded by accelerate, the teacher by
    `--teacher_fsdp shard`; SFTConfig's default gradient checkpointing, so per-layer teacher
    checkpointing too) takes the step of 1 rank on both samples: one SGD step in float32 on a
    2-sample dataset, so both runs see the same samples."""
    family, root = workdir
    if family != "qwen2_5_vl":  # one family: the FSDP path does not depend on it (CI time)
        pytest.skip("FSDP2 through SFTTrainer runs on Qwen2.5-VL only")
    import datasets

    datasets.load_from_disk(str(root / "data")).select(range(2)).save_to_disk(tmp_path / "data")
    (tmp_path / "fsdp.json").write_text(json.dumps({"fsdp_version": 2}))
    sgd = ["--optim", "sgd", "--lr_scheduler_type", "constant", "--max_grad_norm", "0",
           "--weight_decay", "0", "--bf16", "False", "--max_steps", "1",
           "--lm_head_chunk_size", "16", "--dataset_path", str(tmp_path / "data")]  # fmt: skip
    one = _argv(root, tmp_path / "one", *sgd)
    example.main(one, _processor(family))
    fsdp = ["--fsdp", "full_shard auto_wrap", "--fsdp_config", str(tmp_path / "fsdp.json")]
    two = _argv(root, tmp_path / "two", *sgd, "--per_device_train_batch_size", "1", *fsdp)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launch, str(FSDP_WORKER), family, *two], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    model_class = getattr(
        transformers, transformers.AutoConfig.from_pretrained(root / "student").architectures[0]
    )
    before, expected, after = (
        model_class.from_pretrained(path).state_dict()
        for path in (root / "student", tmp_path / "one", tmp_path / "two")
    )
    assert_same_step(after, expected, before)
