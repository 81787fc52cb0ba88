"""The demo's students: the variants, their shared starting point per seed, and one trained and
scored student.

The student's connector and language model start from a random init that depends on the seed
only, the same for every variant; its vision encoder from the shared pretrained weights, so
V_S == V_T at step 0 and the visual-switch term starts at 0 when the teacher kept them frozen (not
when it tuned its own, ``--teacher-tunes-vision``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from switchkd_plugin import SwitchKDArguments
from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.cache import load_tensors, save_atomically
from switchkd_plugin.demo.context import DemoContext
from switchkd_plugin.demo.evaluation import OVERALL, Accuracy
from switchkd_plugin.demo.models import build_model
from switchkd_plugin.demo.teacher import load_vision
from switchkd_plugin.demo.training import BestCheckpoint, plain_sft, train


@dataclass(frozen=True)
class StudentVariant:
    """A student recipe: its ``SwitchKDArguments`` beyond the defaults, and whether its vision
    encoder stays frozen (at the shared weights)."""

    switchkd: dict[str, Any] = field(default_factory=dict)
    freeze_vision: bool = False


_NO_DISTILLATION = {"w_align": 0.0, "w_vsd": 0.0}
# Same init, data, steps and optimizer for all. ``sft_frozen_vision`` is a control: what keeping
# the shared vision encoder fixed gives without any teacher. ``switchkd_onpolicy`` is Switch-KD
# with GKD's default mix (lmbda 0.5): half the micro-batches on the student's own answers,
# sampled at temperature 1, the other half keeping CE on the dataset's answers as every other
# variant does, at half the generation cost of a fully on-policy run.
VARIANTS: dict[str, StudentVariant] = {
    "sft": StudentVariant(_NO_DISTILLATION),
    "fkl": StudentVariant({"align_loss": "fkl", "w_vsd": 0.0}),
    "bild": StudentVariant({"align_loss": "bild", "w_vsd": 0.0}),
    "dbild": StudentVariant({"w_vsd": 0.0}),
    "switchkd": StudentVariant(),
    "vsd_only": StudentVariant({"w_align": 0.0}),
    "sft_frozen_vision": StudentVariant(_NO_DISTILLATION, freeze_vision=True),
    "switchkd_onpolicy": StudentVariant({"lmbda": 0.5}),
}


def switchkd_arguments(variant: str, max_new_tokens: int) -> SwitchKDArguments:
    """The ``SwitchKDArguments`` of a student variant (``VARIANTS``); the teacher is passed as an
    object, so no path is needed. ``max_new_tokens``: the most tokens an on-policy variant
    generates per answer."""
    arguments = SwitchKDArguments(
        distill="switchkd",
        teacher_model_path="in-memory-teacher",
        max_new_tokens=max_new_tokens,
        **VARIANTS[variant].switchkd,
    )
    if arguments.needs_teacher:
        return arguments
    return dataclasses.replace(arguments, teacher_model_path=None)


def initial_student(context: DemoContext, seed: int) -> nn.Module:
    """The student every variant of ``seed`` starts from: connector and LM initialised from
    ``student.seed + seed``, vision encoder from the shared weights; then, when
    ``config.student_warmup.steps > 0``, warmed up with plain SFT, vision frozen (cached under
    ``cache_dir/student-<config.student_key()>``)."""
    config = context.config
    spec = dataclasses.replace(config.student, seed=config.student.seed + seed)
    student = build_model(context.host, spec, context.tokenizer)
    load_vision(student, context.vision_state)
    if config.student_warmup.steps == 0:
        return student
    weights = (
        context.cache_dir
        / f"student-{config.student_key(context.host.name, seed, context.data.content_digest)}.pt"
    )
    if weights.exists():
        student.load_state_dict(load_tensors(weights))
        return student
    vision = adapter_for(student).vision_module
    vision.requires_grad_(False)
    train(
        context.host,
        student,
        context.tokenizer,
        context.split(student, "train"),
        context.host.collator(context.tokenizer),
        config.student_warmup,
        seed=seed,
        output_dir=context.work_dir / f"warmup-{seed}",
        switchkd=plain_sft(),
        description=f"student warm-up (seed {seed})",
    )
    vision.requires_grad_(True)
    save_atomically({weights: student.state_dict()})
    return student


@dataclass(frozen=True)
class StudentRun:
    """One trained student: its test accuracy and training log; with early stopping, the
    validation scores (``[step, overall accuracy]``) and the step of the checkpoint evaluated."""

    variant: str
    seed: int
    accuracy: Accuracy
    log: list[dict[str, float]]
    val_history: list[list[float]] = field(default_factory=list)
    best_step: int | None = None

    @property
    def last_step(self) -> int | None:
        """The step training ended at (its last validation score), None without early
        stopping."""
        return int(self.val_history[-1][0]) if self.val_history else None


@dataclass
class TrainedStudent:
    """A trained student model, its log and, with early stopping, its validation scores
    (``[step, overall accuracy]``) and the step of the checkpoint it holds."""

    model: nn.Module
    log: list[dict[str, float]]
    val_history: list[list[float]] = field(default_factory=list)
    best_step: int | None = None


def train_student(context: DemoContext, variant: str, seed: int) -> TrainedStudent:
    """Train the ``variant`` student of ``seed`` from ``initial_student``; with
    ``config.early_stopping``, stop on the validation split and restore the best checkpoint."""
    student = initial_student(context, seed)
    if VARIANTS[variant].freeze_vision:
        adapter_for(student).vision_module.requires_grad_(False)
    # On-policy answers get as many tokens as the evaluation's: the longest answer and its EOS.
    switchkd = switchkd_arguments(variant, context.max_new_tokens)
    rule = context.config.early_stopping
    stopper = None
    if rule is not None:
        val_description = f"validate {variant}"
        stopper = BestCheckpoint(
            student,
            lambda: context.evaluate(student, val_description, split="val")[OVERALL],
            rule,
        )
    log = train(
        context.host,
        student,
        context.tokenizer,
        context.split(student, "train"),
        context.host.collator(context.tokenizer),
        context.config.student_schedule,
        seed=seed,
        output_dir=context.work_dir / f"{variant}-{seed}",
        switchkd=switchkd,
        teacher=context.teacher if switchkd.needs_teacher else None,
        description=f"student {variant} (seed {seed})",
        callbacks=[stopper] if stopper is not None else [],
    )
    if stopper is None:
        return TrainedStudent(student, log)
    stopper.restore()
    history = [[step, score] for step, score in stopper.history]
    return TrainedStudent(student, log, history, stopper.best_step)


def run_student(context: DemoContext, variant: str, seed: int) -> StudentRun:
    """``train_student``, then score the student on the test split."""
    trained = train_student(context, variant, seed)
    accuracy = context.evaluate(trained.model, f"evaluate {variant}")
    return StudentRun(variant, seed, accuracy, trained.log, trained.val_history, trained.best_step)
