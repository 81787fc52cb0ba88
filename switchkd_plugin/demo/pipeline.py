"""The demo pipeline: a tiny teacher trained on the shapes task, students distilled from it, and
greedy exact-match evaluation on the held-out test split.

Everything model-specific sits behind a ``DemoHost`` (build a model from a spec, read a split,
collate, make left-padded prompts); training (``SwitchKDTrainer``) and evaluation (a greedy loop
over the logits) take the host's model and reach its parts through ``adapter_for``. Only the
transformers LLaVA host (``"hf_llava"``) exists so far; ``"tinyllava"`` is the slot for TinyLLaVA
Factory.

Shared vision weights (the paper's students and teacher start from the same pretrained SigLIP;
none is downloadable here): the teacher is trained from random init with plain SFT, its vision
tower trainable, and every student then starts its vision encoder from the teacher's trained one
(same architecture), so at step 0 V_S == V_T and the visual-switch term starts at ~0. The
student's connector and language model start from a random init that depends on the seed only,
the same for every variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.demo.hf_data import exact_match as _exact_match
from switchkd_plugin.demo.hosts import DemoHost, host_for
from switchkd_plugin.demo.shapes import (
    ANSWERS,
    QUESTION_TYPES,
    LlavaDatasetPaths,
    ShapesTaskConfig,
    Split,
    write_llava_dataset,
)
from switchkd_plugin.testing.tiny_models import (
    EOS_TOKEN,
    TinyVLMSpec,
    build_tokenizer,
    student_spec,
    teacher_spec,
)

DEFAULT_CACHE_DIR = Path("~/.cache/switchkd_plugin/demo").expanduser()
# Bump when a change here changes what a cached teacher would be.
TEACHER_CACHE_VERSION = 1
OVERALL = "overall"

Accuracy = dict[str, float]  # question type (and OVERALL) -> exact-match accuracy


# ------------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class TrainSchedule:
    """One training run: AdamW, linear warm-up then cosine decay, no weight decay."""

    steps: int
    learning_rate: float
    batch_size: int = 16
    warmup_ratio: float = 0.05
    logging_steps: int = 10


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides a demo run's numbers.

    The student's vision depth is the teacher's: students start from the teacher's vision weights.
    ``system_prompt=False`` drops the chat system turn (about 60 tokens of 85) for speed: the
    task does not need it.
    """

    # Larger shapes (14 of 16 px per cell) and the last vision layer: learnt faster from scratch.
    task: ShapesTaskConfig = field(
        default_factory=lambda: ShapesTaskConfig(num_train=4000, object_fraction=0.85)
    )
    teacher: TinyVLMSpec = field(default_factory=lambda: teacher_spec(vision_feature_layer=-1))
    student: TinyVLMSpec = field(
        default_factory=lambda: student_spec(vision_layers=3, vision_feature_layer=-1)
    )
    # Learning rates above ~1e-3 leave these tiny models at the answer prior (measured).
    teacher_schedule: TrainSchedule = TrainSchedule(steps=2000, learning_rate=1e-3)
    student_schedule: TrainSchedule = TrainSchedule(steps=600, learning_rate=1e-3)
    system_prompt: bool = False
    eval_batch_size: int = 100
    max_new_tokens: int = 3
    host: str = "hf_llava"

    def teacher_key(self) -> str:
        """Hash of everything the trained teacher depends on (transformers' version included:
        state-dict layouts differ across releases)."""
        content = {
            "version": TEACHER_CACHE_VERSION,
            "transformers": transformers.__version__,
            "host": self.host,
            "task": dataclasses.asdict(self.task),
            "teacher": dataclasses.asdict(self.teacher),
            "schedule": dataclasses.asdict(self.teacher_schedule),
            "system_prompt": self.system_prompt,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# The built-in default: fits in 5 minutes on 2 CPU cores with an empty cache.
DEFAULT_CONFIG = DemoConfig()
# The CI smoke run: well under a minute.
SMOKE_CONFIG = DemoConfig(
    task=ShapesTaskConfig(num_train=400, num_val=0, num_test=400, object_fraction=0.85),
    teacher_schedule=TrainSchedule(steps=400, learning_rate=1e-3),
    student_schedule=TrainSchedule(steps=10, learning_rate=1e-3, logging_steps=5),
)

# Each student variant's Switch-KD arguments (same init, data, steps and optimizer for all).
VARIANTS: dict[str, dict[str, Any]] = {
    "sft": {"w_align": 0.0, "w_vsd": 0.0},
    "fkl": {"align_loss": "fkl", "w_vsd": 0.0},
    "bild": {"align_loss": "bild", "w_vsd": 0.0},
    "dbild": {"w_vsd": 0.0},
    "switchkd": {},
    "vsd_only": {"w_align": 0.0},
}


def stage(message: str) -> None:
    """A stage message, flushed before the next progress bar starts."""
    print(f"[switchkd demo] {message}", flush=True)


# ------------------------------------------------------------------------------ training


class _ProgressBar(transformers.TrainerCallback):
    """One tqdm bar per run, named, with the latest loss terms as its postfix (instead of the
    Trainer's bar, which prints every log dict on its own line)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.bar = tqdm(total=state.max_steps, desc=self.description, dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        shown = {key: logs[key] for key in ("ce", "align", "vsd") if key in (logs or {})}
        if self.bar is not None and shown:
            self.bar.set_postfix({key: f"{value:.3g}" for key, value in shown.items()})

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.bar.close()


_TOKENIZER_KWARG = (
    "processing_class"
    if "processing_class" in inspect.signature(transformers.Trainer.__init__).parameters
    else "tokenizer"
)


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
) -> list[dict[str, float]]:
    """Train ``model`` in place through ``SwitchKDTrainer``; returns the Trainer's log history
    (per-term ``ce`` / ``align`` / ``vsd`` means every ``logging_steps``)."""
    args = host.training_arguments_class()(
        output_dir=str(output_dir),
        per_device_train_batch_size=schedule.batch_size,
        max_steps=schedule.steps,
        learning_rate=schedule.learning_rate,
        lr_scheduler_type="cosine",
        # Steps, not warmup_ratio (gone in transformers 5): the same ceil(ratio * steps) as 4.x.
        warmup_steps=math.ceil(schedule.warmup_ratio * schedule.steps),
        weight_decay=0.0,
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
        **{_TOKENIZER_KWARG: tokenizer},
    )
    trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
    trainer.add_callback(_ProgressBar(description))
    trainer.train()
    model.eval()
    return [entry for entry in trainer.state.log_history if "ce" in entry]


def switchkd_arguments(variant: str, **overrides: Any) -> SwitchKDArguments:
    """The ``SwitchKDArguments`` of a student variant (``VARIANTS``); the teacher is passed as an
    object, so no path is needed."""
    options = {**VARIANTS[variant], **overrides}
    needs_teacher = options.get("w_align", 1.0) > 0 or options.get("w_vsd", 1.0) > 0
    path = "in-memory-teacher" if needs_teacher else None
    return SwitchKDArguments(distill="switchkd", teacher_model_path=path, **options)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: dict[str, torch.Tensor], eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation ids of a left-padded prompt batch, up to ``max_new_tokens`` each,
    cut after the first ``eos_id``. Re-runs the full forward per token (no KV cache: prompts are
    short, and this behaves the same on every transformers release)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    images = {
        key: value for key, value in prompts.items() if key not in ("input_ids", "attention_mask")
    }
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, **images).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        new.append(token)
        # Finished rows keep generating, ignored below; rows are never right-padded, since
        # transformers 4.40's LLaVA infers the padding side from the last column.
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        if all(eos_id in row for row in torch.cat(new, 1).tolist()):
            break
    rows = torch.cat(new, 1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def chance_accuracy() -> Accuracy:
    """Expected accuracy of a uniform guess among each question type's answers; overall is the
    mean over types (the task's types are equally frequent)."""
    chance = {kind: 1 / len(ANSWERS[kind]) for kind in QUESTION_TYPES}
    chance[OVERALL] = sum(chance.values()) / len(QUESTION_TYPES)
    return chance


def evaluate(
    host: DemoHost,
    model: nn.Module,
    dataset: Any,
    *,
    batch_size: int,
    max_new_tokens: int,
    description: str = "evaluate",
) -> Accuracy:
    """Exact-match accuracy of greedy short answers, per question type and overall."""
    model.eval()
    tokenizer = dataset.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    correct: dict[str, list[bool]] = {kind: [] for kind in QUESTION_TYPES}
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=description, dynamic_ncols=True, leave=False):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        answers = greedy_decode(model, host.prompts(dataset, indices), eos_id, max_new_tokens)
        for i, answer_ids in zip(indices, answers, strict=True):
            prediction = tokenizer.decode(answer_ids, skip_special_tokens=True)
            correct[dataset.question_type(i)].append(_exact_match(prediction, dataset.answer(i)))
    accuracy = {kind: sum(hits) / max(len(hits), 1) for kind, hits in correct.items()}
    accuracy[OVERALL] = sum(map(sum, correct.values())) / max(len(dataset), 1)
    return accuracy


# -------------------------------------------------------------------------------- models


@dataclass
class DemoContext:
    """What every run of one config shares: host, tokenizer, data, the trained teacher."""

    config: DemoConfig
    host: DemoHost
    tokenizer: Any
    paths: LlavaDatasetPaths
    teacher: nn.Module
    work_dir: Path
    teacher_log: list[dict[str, float]]

    def split(self, model: nn.Module, split: Split) -> Any:
        return self.host.dataset(model, self.tokenizer, self.paths, split)

    def evaluate(self, model: nn.Module, description: str) -> Accuracy:
        return evaluate(
            self.host,
            model,
            self.split(model, "test"),
            batch_size=self.config.eval_batch_size,
            max_new_tokens=self.config.max_new_tokens,
            description=description,
        )


def _train_teacher(
    config: DemoConfig, host: DemoHost, tokenizer: Any, paths: LlavaDatasetPaths, work_dir: Path
) -> tuple[nn.Module, list[dict[str, float]]]:
    teacher = host.build(config.teacher, tokenizer)
    log = train(
        host,
        teacher,
        tokenizer,
        host.dataset(teacher, tokenizer, paths, "train"),
        host.collator(tokenizer),
        config.teacher_schedule,
        seed=config.teacher.seed,
        output_dir=work_dir / "teacher",
        switchkd=switchkd_arguments("sft"),
        description="teacher (SFT)",
    )
    return teacher, log


def prepare(config: DemoConfig, cache_dir: Path) -> DemoContext:
    """Write (or reuse) the dataset, then train (or load the cached) teacher.

    The teacher is cached as a state dict under ``cache_dir/teacher-<config.teacher_key()>``
    with its training log; a cached one is rebuilt from its spec and loaded strictly.
    """
    host = host_for(config.host, system_prompt=config.system_prompt)
    stage(f"path: {host.label}")
    tokenizer = build_tokenizer()
    data_dir = cache_dir / f"shapes-{_hash(dataclasses.asdict(config.task))}"
    stage(f"dataset: {config.task.num_train} train / {config.task.num_test} test -> {data_dir}")
    paths = write_llava_dataset(config.task, data_dir)
    teacher_dir = cache_dir / f"teacher-{config.teacher_key()}"
    weights, log_file = teacher_dir / "model.pt", teacher_dir / "train_log.json"
    if weights.exists() and log_file.exists():
        stage(f"teacher: reusing the cached one in {teacher_dir}")
        teacher = host.build(config.teacher, tokenizer)
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log = json.loads(log_file.read_text())
    else:
        stage(
            f"teacher: training with plain SFT for {config.teacher_schedule.steps} steps "
            f"(cached afterwards in {teacher_dir})"
        )
        teacher, log = _train_teacher(config, host, tokenizer, paths, cache_dir / "runs")
        teacher_dir.mkdir(parents=True, exist_ok=True)
        # Written to temporary names and moved: an interrupted run leaves no half teacher.
        torch.save(teacher.state_dict(), weights.with_suffix(".tmp"))
        log_file.with_suffix(".tmp").write_text(json.dumps(log))
        os.replace(log_file.with_suffix(".tmp"), log_file)
        os.replace(weights.with_suffix(".tmp"), weights)
    teacher.eval()
    return DemoContext(config, host, tokenizer, paths, teacher, cache_dir / "runs", log)


def _hash(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def initial_student(context: DemoContext, seed: int) -> nn.Module:
    """The student every variant of ``seed`` starts from: connector and LM randomly initialised
    from ``student.seed + seed``, vision encoder copied from the trained teacher."""
    spec = dataclasses.replace(context.config.student, seed=context.config.student.seed + seed)
    student = context.host.build(spec, context.tokenizer)
    source = adapter_for(context.teacher).vision_module
    target = adapter_for(student).vision_module
    try:
        target.load_state_dict(source.state_dict())
    except RuntimeError as error:
        raise ValueError(
            "the student's vision encoder must have the teacher's architecture (width and depth) "
            f"to start from its weights: {error}"
        ) from error
    return student


@dataclass(frozen=True)
class StudentRun:
    """One trained student: its accuracy and training log."""

    variant: str
    seed: int
    accuracy: Accuracy
    log: list[dict[str, float]]


def run_student(context: DemoContext, variant: str, seed: int) -> StudentRun:
    """Train the ``variant`` student of ``seed`` from ``initial_student`` and evaluate it."""
    student = initial_student(context, seed)
    needs_teacher = switchkd_arguments(variant).needs_teacher
    log = train(
        context.host,
        student,
        context.tokenizer,
        context.split(student, "train"),
        context.host.collator(context.tokenizer),
        context.config.student_schedule,
        seed=seed,
        output_dir=context.work_dir / f"{variant}-{seed}",
        switchkd=switchkd_arguments(variant),
        teacher=context.teacher if needs_teacher else None,
        description=f"student {variant} (seed {seed})",
    )
    accuracy = context.evaluate(student, f"evaluate {variant}")
    return StudentRun(variant, seed, accuracy, log)


# ---------------------------------------------------------------------------------- tables


def accuracy_table(rows: dict[str, Accuracy], title: str = "model") -> str:
    """A markdown table, one row per model: accuracy (%) per question type and overall."""
    columns = [*QUESTION_TYPES, OVERALL]
    lines = [
        f"| {title} | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, accuracy in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[c]:.1f}" for c in columns) + " |"
        )
    return "\n".join(lines)


def run_default(config: DemoConfig, cache_dir: Path, seed: int = 0) -> dict[str, Accuracy]:
    """The built-in default: teacher (cached), one SFT and one Switch-KD student from the same
    init, evaluated on the test split; prints and returns the accuracy table's rows."""
    context = prepare(config, cache_dir)
    stage("evaluating the teacher")
    rows = {"teacher": context.evaluate(context.teacher, "evaluate teacher")}
    for variant, name in (("sft", "SFT student"), ("switchkd", "Switch-KD student")):
        stage(f"{name}: {config.student_schedule.steps} steps from the shared init (seed {seed})")
        rows[name] = run_student(context, variant, seed).accuracy
    rows["chance"] = chance_accuracy()
    stage(
        f"test-split exact-match accuracy (%), {len(context.split(context.teacher, 'test'))} "
        "questions"
    )
    print(accuracy_table(rows), flush=True)
    sys.stdout.flush()
    return rows
