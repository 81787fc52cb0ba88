"""The real Hugging Face Trainer around tiny models, for tests and benchmarks: one-step SGD runs
on pre-collated batches, and the check that two such runs took the same step."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset, SequentialSampler

from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.constants import TOKENIZER_KWARG
from switchkd_plugin.testing.tensor_close import assert_close, parameter_scale
from switchkd_plugin.training.trainer import SwitchKDTrainer, SwitchKDTrainerMixin

# Positions one test step sums its gradients over: a few hundred; this bounds them.
STEP_TERMS = 1024


class Batches(Dataset):
    """Pre-collated batches served one per step (per_device_train_batch_size=1, with
    `first_item` as the collator); each item is a fresh copy, so a step cannot alter the next."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value.clone() for key, value in self.batches[index].items()}


def first_item(items: list[dict]) -> dict:
    """The collator for `Batches`: the one pre-collated batch of a size-1 list."""
    return items[0]


class InOrderTrainer(SwitchKDTrainer):
    """Micro-batches in dataset order (split over ranks in turn): each accumulation window, and
    each step's share of the ranks, is the one a test built."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def training_args(output_dir, **overrides: Any) -> transformers.TrainingArguments:
    """Deterministic CPU settings: one step of plain SGD (lr 0.5, no decay, no clipping, no
    checkpoint), every step logged; `overrides` replace any of them."""
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def make_trainer(
    student: nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    batches: list[dict[str, torch.Tensor]],
    output_dir,
    teacher: nn.Module | None = None,
    trainer_class: type[transformers.Trainer] = SwitchKDTrainer,
    training: dict[str, Any] | None = None,
    peft_config: Any = None,
    **switchkd: Any,
) -> transformers.Trainer:
    """A `trainer_class` that trains `student` on `batches`, one per step.

    Args:
        student: the model to train.
        tokenizer: the student's tokenizer (and the teacher's, when there is a teacher).
        batches: pre-collated batches (input_ids, attention_mask, labels, pixel_values, ...).
        output_dir: the Trainer's output directory.
        teacher: the teacher model object (no path is loaded).
        trainer_class: a Switch-KD Trainer, or a plain `transformers.Trainer` for an SFT baseline.
        training: overrides of `training_args`.
        peft_config: passed on as the Trainer's `peft_config`.
        **switchkd: `SwitchKDArguments` fields (distill defaults to "switchkd"); ignored by a
            Trainer without the Switch-KD mixin.
    """
    kwargs = dict(
        model=student,
        args=training_args(output_dir, **(training or {})),
        train_dataset=Batches(batches),
        data_collator=first_item,
        **{TOKENIZER_KWARG: tokenizer},
    )
    if issubclass(trainer_class, SwitchKDTrainerMixin):
        switchkd.setdefault("distill", "switchkd")
        if switchkd["distill"] == "switchkd":
            switchkd.setdefault("teacher_model_path", "given-as-object")
        kwargs.update(switchkd_args=SwitchKDArguments(**switchkd), teacher_model=teacher)
        if teacher is not None:
            kwargs["teacher_tokenizer"] = tokenizer
    if peft_config is not None:
        kwargs["peft_config"] = peft_config
    return trainer_class(**kwargs)


def split_batch(batch: dict[str, torch.Tensor], sizes: tuple[int, ...]) -> list[dict]:
    """Micro-batches of a collated batch, `sizes[i]` samples each (right padding: the extra pad
    columns a micro-batch keeps change nothing)."""
    out, start = [], 0
    for size in sizes:
        out.append({key: value[start : start + size] for key, value in batch.items()})
        start += size
    return out


def assert_same_step(
    after: dict[str, torch.Tensor],
    expected_after: dict[str, torch.Tensor],
    before: dict[str, torch.Tensor],
) -> None:
    """Two optimizer steps from `before` moved every parameter the same way, to float32
    rounding: that of the gradient sums (relative to the step's size) plus one rounding of
    the weight the step was added to. A normaliser off by one token in 40 is off by 2.5e-2
    of the step, hundreds of times this. All three are state dicts; at least one parameter
    must have moved."""
    steps = {name: expected_after[name] - start for name, start in before.items()}
    moved = False
    for name, start in before.items():
        moved |= bool(steps[name].abs().max() > 1e-6)
        assert_close(
            after[name],
            expected_after[name],
            terms=STEP_TERMS,
            scale=parameter_scale(name, steps),
            extra=torch.finfo(start.dtype).eps * float(expected_after[name].abs().max()),
            name=name,
        )
    assert moved


def assert_only_changed_in(
    model: nn.Module, before: dict[str, torch.Tensor], part: nn.Module
) -> None:
    """Some parameter of `model` moved from `before` (a copy of its named parameters), and
    every one that moved belongs to `part` (a submodule, e.g. the vision encoder)."""
    inside = {id(parameter) for parameter in part.parameters()}
    changed = {
        name
        for name, parameter in model.named_parameters()
        if not torch.equal(parameter, before[name])
    }
    outside = {name for name, parameter in model.named_parameters() if id(parameter) not in inside}
    assert changed, "no parameter moved"
    assert not changed & outside, f"moved outside the part: {sorted(changed & outside)}"
