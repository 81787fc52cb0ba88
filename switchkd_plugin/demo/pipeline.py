"""The demo pipeline: shared vision weights, a tiny teacher trained on the shapes task, students
distilled from it, and greedy exact-match evaluation on the held-out test split.

Everything model-specific sits behind a ``DemoHost`` (``demo/hosts.py``: build a model from a
spec, read a split, collate, make left-padded prompts, name the Trainer); training (the host's
Switch-KD Trainer) and evaluation (a greedy loop over the logits) take the host's model and reach
its parts through ``adapter_for``.

Shared vision weights (the paper's teacher and students start from the same pretrained SigLIP;
none is downloadable here): one vision encoder of the teacher's architecture is pretrained on
per-cell shape and colour labels of the train scenes (``demo/vision_pretrain.py``). The teacher
starts from it and is trained with plain SFT, its vision encoder frozen, so every student, which
starts its vision encoder from the same pretrained weights, has V_S == V_T at step 0 and the
visual-switch term starts at 0. The student's connector and language model start from a random
init that depends on the seed only, the same for every variant.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
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
    generate_splits,
    write_llava_dataset,
)
from switchkd_plugin.demo.vision_pretrain import cell_accuracy, cell_labels, pretrain_vision
from switchkd_plugin.testing.tiny_models import (
    EOS_TOKEN,
    TinyVLMSpec,
    build_tokenizer,
    student_spec,
    teacher_spec,
)

DEFAULT_CACHE_DIR = Path("~/.cache/switchkd_plugin/demo").expanduser()
# Bump when a change here changes what a cached vision encoder, teacher or warmed-up student
# would be (all three keys include it).
MODEL_CACHE_VERSION = 2
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

    The student's vision encoder has the teacher's architecture: both start from the same
    pretrained weights (``vision_schedule``), and the teacher's stays frozen during its SFT.
    ``system_prompt=False`` drops the chat system turn (about 60 tokens of 85) for speed: the
    task does not need it.
    """

    # Larger shapes (14 of 16 px per cell) and the last vision layer: learnt faster.
    task: ShapesTaskConfig = field(
        default_factory=lambda: ShapesTaskConfig(num_train=4000, object_fraction=0.85)
    )
    teacher: TinyVLMSpec = field(default_factory=lambda: teacher_spec(vision_feature_layer=-1))
    student: TinyVLMSpec = field(
        default_factory=lambda: student_spec(vision_layers=3, vision_feature_layer=-1)
    )
    # The shared vision encoder's pretraining on per-cell shape / colour labels.
    vision_schedule: TrainSchedule = TrainSchedule(steps=600, learning_rate=1e-3, batch_size=32)
    # Learning rates above ~1e-3 leave these tiny models at the answer prior (measured).
    teacher_schedule: TrainSchedule = TrainSchedule(steps=3000, learning_rate=1e-3)
    student_schedule: TrainSchedule = TrainSchedule(steps=600, learning_rate=1e-3)
    # Steps 0: students start cold (random connector and LM). Else each seed's student is first
    # warmed up with plain SFT, its vision encoder frozen (as a student whose LM and connector
    # were trained before the distillation stage), and every variant continues from there.
    student_warmup: TrainSchedule = TrainSchedule(steps=0, learning_rate=1e-3)
    system_prompt: bool = False
    eval_batch_size: int = 100
    max_new_tokens: int = 3
    host: str = "auto"  # demo/hosts.py: HOSTS

    def vision_key(self, host: str) -> str:
        """Hash of everything the pretrained vision encoder depends on (transformers' version
        included: state-dict layouts differ across releases); ``host``: the resolved host name."""
        return _hash(
            {
                "version": MODEL_CACHE_VERSION,
                "transformers": transformers.__version__,
                "host": host,
                "task": dataclasses.asdict(self.task),
                "teacher": dataclasses.asdict(self.teacher),
                "vision_schedule": dataclasses.asdict(self.vision_schedule),
            }
        )

    def student_key(self, host: str, seed: int) -> str:
        """Hash of everything a warmed-up student of ``seed`` depends on."""
        return _hash(
            {
                "vision": self.vision_key(host),
                "student": dataclasses.asdict(self.student),
                "warmup": dataclasses.asdict(self.student_warmup),
                "system_prompt": self.system_prompt,
                "seed": seed,
            }
        )

    def teacher_key(self, host: str) -> str:
        """Hash of everything the trained teacher depends on."""
        return _hash(
            {
                "vision": self.vision_key(host),
                "schedule": dataclasses.asdict(self.teacher_schedule),
                "system_prompt": self.system_prompt,
            }
        )


# The built-in default: fits in 5 minutes on 2 CPU cores with an empty cache.
DEFAULT_CONFIG = DemoConfig()
# The CI smoke run: well under a minute.
SMOKE_CONFIG = DemoConfig(
    task=ShapesTaskConfig(num_train=400, num_val=0, num_test=400, object_fraction=0.85),
    vision_schedule=TrainSchedule(steps=100, learning_rate=1e-3, batch_size=32),
    teacher_schedule=TrainSchedule(steps=400, learning_rate=1e-3),
    student_schedule=TrainSchedule(steps=10, learning_rate=1e-3, logging_steps=5),
)


@dataclass(frozen=True)
class StudentVariant:
    """A student recipe: its ``SwitchKDArguments`` beyond the defaults, and whether its vision
    encoder stays frozen (at the shared pretrained weights)."""

    switchkd: dict[str, Any] = field(default_factory=dict)
    freeze_vision: bool = False


_NO_DISTILLATION = {"w_align": 0.0, "w_vsd": 0.0}
# Same init, data, steps and optimizer for all. ``sft_frozen_vision`` is a control: what keeping
# the pretrained vision encoder fixed gives without any teacher.
VARIANTS: dict[str, StudentVariant] = {
    "sft": StudentVariant(_NO_DISTILLATION),
    "fkl": StudentVariant({"align_loss": "fkl", "w_vsd": 0.0}),
    "bild": StudentVariant({"align_loss": "bild", "w_vsd": 0.0}),
    "dbild": StudentVariant({"w_vsd": 0.0}),
    "switchkd": StudentVariant(),
    "vsd_only": StudentVariant({"w_align": 0.0}),
    "sft_frozen_vision": StudentVariant(_NO_DISTILLATION, freeze_vision=True),
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
    """Train ``model`` in place through the host's Switch-KD Trainer; returns the Trainer's log
    history (per-term ``ce`` / ``align`` / ``vsd`` means every ``logging_steps``)."""
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
        **{_TOKENIZER_KWARG: tokenizer},
    )
    # Our bar replaces the Trainer's (or its printer of log dicts, used when logging is quiet).
    for callback in (transformers.ProgressCallback, transformers.PrinterCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(_ProgressBar(description))
    trainer.train()
    model.eval()
    return [entry for entry in trainer.state.log_history if "ce" in entry]


def switchkd_arguments(variant: str) -> SwitchKDArguments:
    """The ``SwitchKDArguments`` of a student variant (``VARIANTS``); the teacher is passed as an
    object, so no path is needed."""
    arguments = SwitchKDArguments(
        distill="switchkd", teacher_model_path="in-memory-teacher", **VARIANTS[variant].switchkd
    )
    if arguments.needs_teacher:
        return arguments
    return dataclasses.replace(arguments, teacher_model_path=None)


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
        # Finished rows keep generating, ignored below. Rows are never right-padded: the last
        # position must be each row's own (transformers 4.40's LLaVA infers the padding side
        # from the last column; the TinyLLaVA host's models re-pad on the left after splicing).
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
    """What every run of one config shares: host, tokenizer, data, the pretrained vision
    encoder's weights, the trained teacher."""

    config: DemoConfig
    host: DemoHost
    tokenizer: Any
    paths: LlavaDatasetPaths
    vision_state: dict[str, torch.Tensor]
    teacher: nn.Module
    cache_dir: Path

    @property
    def work_dir(self) -> Path:
        """Where the Trainers' (empty: nothing is saved) output directories go."""
        return self.cache_dir / "runs"

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


def _load_vision(model: nn.Module, vision_state: dict[str, torch.Tensor]) -> None:
    try:
        adapter_for(model).vision_module.load_state_dict(vision_state)
    except RuntimeError as error:
        raise ValueError(
            "the student's vision encoder must have the teacher's architecture (width and depth) "
            f"to start from the shared pretrained weights: {error}"
        ) from error


def _save(files: dict[Path, Any]) -> None:
    """Write each path's content (tensors with ``torch.save``, else JSON) to a temporary name,
    then move all into place: an interrupted run leaves nothing half-written behind."""
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        if path.suffix == ".pt":
            torch.save(content, temporary)
        else:
            temporary.write_text(json.dumps(content))
    for path in files:
        os.replace(path.with_suffix(".tmp"), path)


def _pretrained_vision(
    config: DemoConfig, host: DemoHost, tokenizer: Any, paths: LlavaDatasetPaths, cache_dir: Path
) -> dict[str, torch.Tensor]:
    """The shared vision encoder's pretrained state dict: cached under
    ``cache_dir/vision-<config.vision_key()>``, else trained now (``demo/vision_pretrain.py``)."""
    vision_dir = cache_dir / f"vision-{config.vision_key(host.name)}"
    weights = vision_dir / "vision.pt"
    if weights.exists():
        stage(f"shared vision encoder: reusing the pretrained one in {vision_dir}")
        return torch.load(weights, map_location="cpu", weights_only=True)
    schedule = config.vision_schedule
    stage(
        f"shared vision encoder: pretraining on per-cell shape/colour labels for {schedule.steps} "
        f"steps (cached afterwards in {vision_dir})"
    )
    model = host.build(config.teacher, tokenizer)
    splits = generate_splits(config.task)
    image_size = config.task.image_size
    probe = pretrain_vision(
        model,
        cell_labels(splits["train"], paths, image_size),
        steps=schedule.steps,
        learning_rate=schedule.learning_rate,
        batch_size=schedule.batch_size,
        seed=config.teacher.seed,
    )
    accuracy = cell_accuracy(model, probe, cell_labels(splits["test"], paths, image_size))
    stage(
        f"shared vision encoder: test-scene cells, shape {100 * accuracy['shape']:.1f}% / "
        f"colour {100 * accuracy['colour']:.1f}% right (linear probe)"
    )
    state = adapter_for(model).vision_module.state_dict()
    _save({weights: state, vision_dir / "probe_accuracy.json": accuracy})
    return state


def _teacher(
    config: DemoConfig,
    host: DemoHost,
    tokenizer: Any,
    paths: LlavaDatasetPaths,
    vision_state: dict[str, torch.Tensor],
    cache_dir: Path,
) -> nn.Module:
    """The teacher: cached as a state dict (and its SFT log, for inspection) under
    ``cache_dir/teacher-<config.teacher_key()>`` (rebuilt from its spec and loaded strictly),
    else trained now from the shared vision weights, its vision encoder frozen."""
    teacher_dir = cache_dir / f"teacher-{config.teacher_key(host.name)}"
    weights, log_file = teacher_dir / "model.pt", teacher_dir / "train_log.json"
    teacher = host.build(config.teacher, tokenizer)
    if weights.exists() and log_file.exists():
        stage(f"teacher: reusing the cached one in {teacher_dir}")
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return teacher
    stage(
        f"teacher: training with plain SFT for {config.teacher_schedule.steps} steps, vision "
        f"encoder frozen (cached afterwards in {teacher_dir})"
    )
    _load_vision(teacher, vision_state)
    adapter_for(teacher).vision_module.requires_grad_(False)
    log = train(
        host,
        teacher,
        tokenizer,
        host.dataset(teacher, tokenizer, paths, "train"),
        host.collator(tokenizer),
        config.teacher_schedule,
        seed=config.teacher.seed,
        output_dir=cache_dir / "runs" / "teacher",
        switchkd=switchkd_arguments("sft"),
        description="teacher (SFT)",
    )
    _save({weights: teacher.state_dict(), log_file: log})
    return teacher


def prepare(config: DemoConfig, cache_dir: Path) -> DemoContext:
    """Write (or reuse) the dataset, then pretrain (or load) the shared vision encoder and train
    (or load) the teacher."""
    host = host_for(config.host, system_prompt=config.system_prompt)
    stage(f"path: {host.label}")
    tokenizer = build_tokenizer()
    data_dir = cache_dir / f"shapes-{_hash(dataclasses.asdict(config.task))}"
    stage(f"dataset: {config.task.num_train} train / {config.task.num_test} test -> {data_dir}")
    paths = write_llava_dataset(config.task, data_dir)
    vision_state = _pretrained_vision(config, host, tokenizer, paths, cache_dir)
    teacher = _teacher(config, host, tokenizer, paths, vision_state, cache_dir)
    teacher.eval()
    teacher.requires_grad_(False)
    return DemoContext(config, host, tokenizer, paths, vision_state, teacher, cache_dir)


def _hash(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def initial_student(context: DemoContext, seed: int) -> nn.Module:
    """The student every variant of ``seed`` starts from: connector and LM randomly initialised
    from ``student.seed + seed``, vision encoder from the shared pretrained weights; then, when
    ``config.student_warmup.steps > 0``, warmed up with plain SFT, vision frozen (cached under
    ``cache_dir/student-<config.student_key()>``)."""
    config = context.config
    spec = dataclasses.replace(config.student, seed=config.student.seed + seed)
    student = context.host.build(spec, context.tokenizer)
    _load_vision(student, context.vision_state)
    if config.student_warmup.steps == 0:
        return student
    weights = context.cache_dir / f"student-{config.student_key(context.host.name, seed)}.pt"
    if weights.exists():
        student.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
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
        switchkd=switchkd_arguments("sft"),
        description=f"student warm-up (seed {seed})",
    )
    vision.requires_grad_(True)
    _save({weights: student.state_dict()})
    return student


@dataclass(frozen=True)
class StudentRun:
    """One trained student: its accuracy and training log."""

    variant: str
    seed: int
    accuracy: Accuracy
    log: list[dict[str, float]]


def train_student(
    context: DemoContext, variant: str, seed: int
) -> tuple[nn.Module, list[dict[str, float]]]:
    """The ``variant`` student of ``seed``, trained from ``initial_student``, and its log."""
    student = initial_student(context, seed)
    if VARIANTS[variant].freeze_vision:
        adapter_for(student).vision_module.requires_grad_(False)
    switchkd = switchkd_arguments(variant)
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
    )
    return student, log


def run_student(context: DemoContext, variant: str, seed: int) -> StudentRun:
    """Train the ``variant`` student of ``seed`` and evaluate it."""
    student, log = train_student(context, variant, seed)
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
    stage(f"test-split exact-match accuracy (%), {config.task.num_test} questions")
    print(accuracy_table(rows), flush=True)
    return rows
