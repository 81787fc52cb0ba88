"""One training run of a demo model through the host's Switch-KD Trainer, optionally stopped early
on a validation score with the best checkpoint restored."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset

from switchkd_plugin import SwitchKDArguments
from switchkd_plugin.constants import TOKENIZER_KWARG
from switchkd_plugin.demo.config import EarlyStopping, TrainSchedule
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.demo.progress import ProgressBar


def plain_sft() -> SwitchKDArguments:
    """Cross-entropy only: no teacher, no distillation terms."""
    return SwitchKDArguments(distill="switchkd", w_align=0.0, w_vsd=0.0, teacher_model_path=None)


class BestCheckpoint(transformers.TrainerCallback):
    """Early stopping (``EarlyStopping``): scores the model every ``eval_every`` steps and at the
    last one, keeps a copy of the best state, and stops after ``patience`` scores without a gain.
    ``restore()`` loads the best state back into the model."""

    def __init__(self, model: nn.Module, score: Callable[[], float], rule: EarlyStopping) -> None:
        self.model, self.score, self.rule = model, score, rule
        self.history: list[tuple[int, float]] = []  # (step, score)
        self.best_step, self.best_score = 0, -math.inf
        self._best_state: dict[str, torch.Tensor] | None = None
        self._without_gain = 0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        step = state.global_step
        if step % self.rule.eval_every and step != state.max_steps:
            return
        score = self.score()
        self.model.train()
        self.history.append((step, score))
        if score > self.best_score:
            self.best_step, self.best_score, self._without_gain = step, score, 0
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            return
        self._without_gain += 1
        if self._without_gain >= self.rule.patience:
            control.should_training_stop = True

    def restore(self) -> None:
        if self._best_state is None:
            raise RuntimeError("no score was taken: the run stopped before its first evaluation")
        self.model.load_state_dict(self._best_state)


def cosine_with_warmup(schedule: TrainSchedule) -> Callable[[int], float]:
    """The learning-rate factor of ``schedule`` at a step: linear warm-up then cosine decay to
    0, as ``transformers.get_cosine_schedule_with_warmup``."""
    warmup = math.ceil(schedule.warmup_ratio * schedule.steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, schedule.steps - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def scaled_group_optimizer(
    model: nn.Module, schedule: TrainSchedule, group: nn.Module, scale: float, start_step: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no weight decay) over ``model``'s trainable parameters and its schedule: those of
    ``group`` at ``scale`` x the learning rate from ``start_step`` on and 0 before (Adam's
    moments still gather), the rest at the learning rate."""
    in_group = {id(parameter) for parameter in group.parameters()}
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in trainable if id(p) not in in_group]},
            {"params": [p for p in trainable if id(p) in in_group]},
        ],
        lr=schedule.learning_rate,
        weight_decay=0.0,
    )
    factor = cosine_with_warmup(schedule)

    def group_factor(step: int) -> float:
        return scale * factor(step) if step >= start_step else 0.0

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [factor, group_factor])


def train(
    host: DemoHost,
    model: nn.Module,
    tokenizer: Any,
    dataset: Dataset,
    collator: Callable[[Sequence[dict]], dict],
    schedule: TrainSchedule,
    *,
    seed: int,
    output_dir: Path,
    switchkd: SwitchKDArguments,
    teacher: nn.Module | None = None,
    description: str = "train",
    callbacks: Sequence[transformers.TrainerCallback] = (),
    optimizers: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler] | None = None,
) -> list[dict[str, float]]:
    """Train ``model`` in place through the host's Switch-KD Trainer; returns the Trainer's log
    history (per-term ``ce`` / ``align`` / ``vsd`` means every ``logging_steps``). ``optimizers``:
    an optimizer and its schedule in place of the Trainer's (``scaled_group_optimizer``)."""
    args = host.training_arguments_class()(
        output_dir=str(output_dir),
        per_device_train_batch_size=schedule.batch_size,
        max_steps=schedule.steps,
        learning_rate=schedule.learning_rate,
        lr_scheduler_type="cosine",
        # Steps, not warmup_ratio (gone in transformers 5): the same ceil(ratio * steps) as 4.x.
        warmup_steps=math.ceil(schedule.warmup_ratio * schedule.steps),
        weight_decay=0.0,
        optim="adamw_torch",  # the Factory's pin; transformers 5 defaults to the fused kernel
        logging_steps=schedule.logging_steps,
        report_to=[],
        save_strategy="no",
        remove_unused_columns=False,
        use_cpu=True,
        seed=seed,  # data order
        dataloader_num_workers=0,
    )
    # Built right before .train(): accelerate keeps accumulation state in a process singleton.
    trainer = host.trainer_class()(
        model=model,
        args=args,
        switchkd_args=switchkd,
        teacher_model=teacher,
        teacher_tokenizer=tokenizer if teacher is not None else None,
        train_dataset=dataset,
        data_collator=collator,
        **({"optimizers": optimizers} if optimizers is not None else {}),
        **{TOKENIZER_KWARG: tokenizer},
    )
    # Our bar replaces the Trainer's (or its printer of log dicts, used when logging is quiet).
    for callback in (transformers.ProgressCallback, transformers.PrinterCallback):
        trainer.remove_callback(callback)
    for callback in (ProgressBar(description), *callbacks):
        trainer.add_callback(callback)
    trainer.train()
    model.eval()
    return [entry for entry in trainer.state.log_history if "ce" in entry]
