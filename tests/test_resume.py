"""Resuming from a checkpoint continues exactly as the uninterrupted run, or refuses to."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import switchkd_plugin
from switchkd_plugin.testing import make_host_batch
from switchkd_plugin.testing.trainer import make_trainer
from switchkd_plugin.training.resume import SETTINGS_FILE

STEPS, SAVE_AT = 8, 4
# AdamW state, a schedule that changes every step and accumulation: everything resume restores.
TRAINING = {
    "max_steps": STEPS,
    "optim": "adamw_torch",
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "gradient_accumulation_steps": 2,
    "save_strategy": "steps",
    "save_steps": SAVE_AT,
}


def _run(student, teacher, tokenizer, batches, out, resume=None, **switchkd):
    trainer = make_trainer(
        copy.deepcopy(student),
        tokenizer,
        batches,
        out,
        teacher=None if switchkd.get("distill") == "none" else teacher,
        training=TRAINING,
        **switchkd,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _step_logs(trainer) -> dict[int, tuple]:
    """Each logged step's loss terms, unrounded (4.40 rounds `loss` to 4 digits)."""
    keys = ("ce", "align", "vsd", "total", "loss")
    return {
        entry["step"]: tuple(entry.get(key) for key in keys)
        for entry in trainer.state.log_history
        if "loss" in entry and entry["step"] > SAVE_AT
    }


@pytest.mark.parametrize("distill", ["switchkd", "none"])
def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(
    models, tiny_tokenizer, tmp_path, distill
):
    student, teacher = models
    # 16 micro-batches = one epoch of 8 steps: the checkpoint at step 4 is mid-epoch.
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in range(2 * STEPS)]
    whole = _run(student, teacher, tiny_tokenizer, batches, tmp_path / "a", distill=distill)
    resumed = _run(
        student,
        teacher,
        tiny_tokenizer,
        batches,
        tmp_path / "b",
        resume=str(tmp_path / "a" / f"checkpoint-{SAVE_AT}"),
        distill=distill,
    )
    expected_logs = _step_logs(whole)
    assert sorted(expected_logs) == list(range(SAVE_AT + 1, STEPS + 1))
    assert _step_logs(resumed) == expected_logs
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_a_checkpoint_that_cannot_restore_every_weight_is_refused(
    hf_student, tiny_tokenizer, tmp_path
):
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=s) for s in range(8)]
    training = {**TRAINING, "max_steps": 2, "save_steps": 1, "gradient_accumulation_steps": 1}
    make_trainer(
        copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, distill="none",
        training=training,
    ).train()  # fmt: skip
    weights = tmp_path / "checkpoint-1" / "model.safetensors"
    tensors = load_file(str(weights))
    lost = next(key for key in tensors if "embed_tokens" in key)
    tensors["renamed_by_hand.weight"] = tensors.pop(lost)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    trainer = make_trainer(
        copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, distill="none",
        training=training,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cannot restore the model's weights exactly.*missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))


class _CreatesFileWhenUnpickled:
    """What a crafted `training_args.bin` can hold: unpickling it runs `open(marker, "w")`."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


SHORT = {**TRAINING, "max_steps": 2, "save_steps": 1, "gradient_accumulation_steps": 1}


@pytest.mark.parametrize("distill", ["switchkd", "none"])
def test_resuming_never_unpickles_training_args_and_says_the_settings_were_not_checked(
    models, tiny_tokenizer, tmp_path, caplog, distill
):
    student, teacher = models
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in range(2)]
    first = make_trainer(
        copy.deepcopy(student), tiny_tokenizer, batches, tmp_path / "a", distill=distill,
        teacher=None if distill == "none" else teacher, training=SHORT,
    )  # fmt: skip
    first.train()
    checkpoint = tmp_path / "a" / "checkpoint-1"
    (checkpoint / SETTINGS_FILE).unlink(missing_ok=True)  # as a plain Trainer writes it
    trap, marker = _CreatesFileWhenUnpickled(tmp_path / "ran"), tmp_path / "ran"
    torch.save(trap, checkpoint / "training_args.bin")
    torch.load(checkpoint / "training_args.bin", weights_only=False)
    assert marker.exists(), "the trap does not work: this test would prove nothing"
    marker.unlink()
    trainer = make_trainer(
        copy.deepcopy(student), tiny_tokenizer, batches, tmp_path / "b", distill=distill,
        teacher=None if distill == "none" else teacher, training=SHORT,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin.training.resume"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
    assert trainer.state.global_step == 2
    assert caplog.text.count("could not be checked") == 1


def test_settings_passed_as_switchkd_args_are_saved_as_json_and_checked(
    models, tiny_tokenizer, tmp_path
):
    student, teacher = models
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in range(2)]

    def run(out, resume=None, **switchkd):
        trainer = make_trainer(
            copy.deepcopy(student), tiny_tokenizer, batches, out, teacher=teacher,
            training=SHORT, **switchkd,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)

    run(tmp_path / "a", temperature=2.0)
    record = json.loads((tmp_path / "a" / "checkpoint-1" / SETTINGS_FILE).read_text())
    assert record["switchkd_plugin_version"] == switchkd_plugin.__version__
    assert record["settings"]["temperature"] == 2.0
    assert record["settings"]["distill"] == "switchkd"
    with pytest.raises(ValueError, match=re.escape("--temperature was 2.0, now 3.0")):
        run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-1"))
