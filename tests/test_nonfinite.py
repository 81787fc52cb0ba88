"""A NaN/inf loss term never reaches the weights: an error naming the term and where it went
bad (`--nonfinite error`), or a micro-batch dropped with exactly zero gradient (`skip`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import transformers

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.testing import IGNORE_INDEX, make_host_batch
from switchkd_plugin.testing.trainer import InOrderTrainer, make_trainer


def _poisoned(student, tokenizer, seed: int) -> dict:
    """A batch whose images hold one NaN (a broken image file, a bad normalisation)."""
    batch = make_host_batch(student, tokenizer, n=2, seed=seed)
    batch[adapter_for(student).images_key].view(-1)[5] = float("nan")
    return batch


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(x, y), name


def test_ce_only_run_stops_on_a_nan_input_naming_the_side_and_the_input(
    models, tiny_tokenizer, tmp_path
):
    student, _ = models
    key = adapter_for(student).images_key
    trainer = make_trainer(
        copy.deepcopy(student), tiny_tokenizer, [_poisoned(student, tiny_tokenizer, 0)],
        tmp_path, w_align=0.0, w_vsd=0.0,
    )  # fmt: skip
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    text = str(error.value)
    assert "non-finite ce (student) at step 0" in text
    assert f"first non-finite: the batch's `{key}`" in text
    assert "pixel_values" in text and "learning rate too high" in text and "fp16" in text
    _same_weights(trainer.model, student)  # no optimizer step applied it


def test_a_nan_teacher_is_named_with_the_terms_it_breaks(models, tiny_tokenizer, tmp_path):
    student, teacher = models
    next(adapter_for(teacher).connector.parameters()).data.view(-1)[0] = float("nan")
    trainer = make_trainer(
        copy.deepcopy(student), tiny_tokenizer, [make_host_batch(student, tiny_tokenizer, n=2)],
        tmp_path, teacher=teacher,
    )  # fmt: skip
    with pytest.raises(FloatingPointError) as error:
        trainer.train()
    text = str(error.value)
    assert "align (student vs teacher), vsd (switch vs teacher)" in text
    assert "ce (student)" not in text
    assert "the teacher pathway's connector output" in text
    assert "the switch pathway's connector output" in text
    _same_weights(trainer.model, student)


def test_skip_drops_the_batch_with_exactly_zero_gradient_and_counts_it(
    models, tiny_tokenizer, tmp_path, caplog
):
    student, teacher = models
    good = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in (1, 2)]
    # The reference sees a batch whose every label is ignored: terms 0, gradient exactly 0.
    empty = copy.deepcopy(good[0])
    empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
    runs = {}
    for name, middle in (("skip", _poisoned(student, tiny_tokenizer, 3)), ("reference", empty)):
        trainer = make_trainer(
            copy.deepcopy(student), tiny_tokenizer, [good[0], middle, good[1]], tmp_path,
            teacher=teacher, nonfinite="skip", training={"max_steps": 3},
        )  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
            trainer.train()
        runs[name] = trainer
    assert "skipping this micro-batch (1 in a row)" in caplog.text
    _same_weights(runs["skip"].model, runs["reference"].model)
    logs = [e for e in runs["skip"].state.log_history if "nonfinite_skipped" in e]
    assert [e["nonfinite_skipped"] for e in logs] == [
        e["distilled_tokens"] == 0 for e in runs["reference"].state.log_history if "ce" in e
    ]  # the skipped step is the one the reference saw empty
    assert all(v == v for e in logs for k, v in e.items() if k in ("ce", "align", "vsd", "loss"))


def test_skip_stops_after_the_given_number_in_a_row(hf_student, tiny_tokenizer, tmp_path):
    batches = [_poisoned(hf_student, tiny_tokenizer, seed) for seed in range(4)]
    trainer = make_trainer(
        copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, w_align=0.0, w_vsd=0.0,
        nonfinite="skip", nonfinite_max_in_a_row=3, training={"max_steps": 4},
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"Stopped after 3 such micro-batches in a row"):
        trainer.train()
    assert trainer.state.global_step == 2  # two skipped steps, the third stops the run
    _same_weights(trainer.model, hf_student)  # SGD on zero gradients moves nothing


class _AfterEachStep(transformers.TrainerCallback):
    """Weights, optimizer state and learning rate after each of the Trainer's steps."""

    def __init__(self) -> None:
        self.after: dict[int, tuple] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after[state.global_step] = (
            copy.deepcopy(model.state_dict()),
            copy.deepcopy(optimizer.state_dict()["state"]),
            kwargs["lr_scheduler"].get_last_lr(),
        )


def _equal_states(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(x, b[key]) if torch.is_tensor(x) else _equal_states(x, b[key])
        for key, x in a.items()
    )


def test_a_window_of_skipped_micro_batches_makes_no_adamw_step(
    hf_student, tiny_tokenizer, tmp_path, caplog
):
    good = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=s) for s in range(3)]
    nan = [_poisoned(hf_student, tiny_tokenizer, seed) for seed in range(3, 6)]
    # Windows of 2: both finite, both NaN (no step), one NaN and one finite (a step on it).
    batches = [good[0], good[1], nan[0], nan[1], nan[2], good[2]]
    trainer = make_trainer(
        copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, w_align=0.0, w_vsd=0.0,
        trainer_class=InOrderTrainer, nonfinite="skip", training={
            "max_steps": 3, "gradient_accumulation_steps": 2, "optim": "adamw_torch",
            "weight_decay": 0.1, "learning_rate": 1e-2, "lr_scheduler_type": "linear",
        },
    )  # fmt: skip
    snapshots = _AfterEachStep()
    trainer.add_callback(snapshots)
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        trainer.train()
    (weights_1, moments_1, lr_1), (weights_2, moments_2, lr_2), (weights_3, moments_3, lr_3) = (
        snapshots.after[step] for step in (1, 2, 3)
    )
    assert _equal_states(weights_2, weights_1)
    assert _equal_states(moments_2, moments_1)  # exp_avg, exp_avg_sq and the step count
    assert lr_2 == lr_1  # the schedule did not advance either
    assert "window of step 2 was non-finite and skipped: no optimizer step" in caplog.text
    logs = [e for e in trainer.state.log_history if "loss" in e]
    skipped_steps = {e["step"]: e["nonfinite_skipped_steps"] for e in logs}
    assert skipped_steps == {1: 0, 2: 1, 3: 0}
    # The last window steps on its finite micro-batch, with the LR the skipped step had.
    assert not _equal_states(weights_3, weights_2)
    # The skipped micro-batch gives no gradient to parameters no loss reaches (SigLIP's unused
    # pooling head): AdamW keeps no state for them, and their weights see no decay.
    assert moments_3.keys() == moments_1.keys()
    assert all(moments_3[key]["step"] == 2 for key in moments_1)  # 1 + this step
    assert lr_3 < lr_2
