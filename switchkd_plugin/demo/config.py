"""What decides a demo run's numbers: the task or dataset, the model sizes, every training
schedule, and the students' stopping rule; and the cache keys derived from them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import transformers

from switchkd_plugin.demo.shapes import ShapesTaskConfig
from switchkd_plugin.testing.tiny_models import TinyVLMSpec, student_spec, teacher_spec

# Bump when a code change changes what a cached vision encoder, teacher or warmed-up student
# would be (all three keys include it). 3: the demo draws its own initial weights (models.py).
MODEL_CACHE_VERSION = 3


def stable_hash(content: Any) -> str:
    """A short hash of JSON-serialisable ``content``, the same in every process."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TrainSchedule:
    """One training run: AdamW, linear warm-up then cosine decay, no weight decay."""

    steps: int
    learning_rate: float
    batch_size: int = 16
    warmup_ratio: float = 0.05
    logging_steps: int = 10


@dataclass(frozen=True)
class MaskedPatchRecipe:
    """The shared vision encoder's label-free pretraining (``demo/vision_pretrain.py``): the
    share of each image's patches blanked, and the weight of the visible patches'
    reconstruction error beside the blanked ones'."""

    mask_ratio: float = 0.5
    visible_weight: float = 1.0
    contrast_weight: float = 0.0
    colour_views: bool = False
    temperature: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0 or self.visible_weight < 0.0:
            raise ValueError(
                f"mask_ratio must be in [0, 1) and visible_weight >= 0, got {self.mask_ratio}, "
                f"{self.visible_weight}"
            )


@dataclass(frozen=True)
class TeacherVision:
    """How the teacher's SFT treats its vision encoder (which starts from the shared pretrained
    weights): ``lr_scale`` 0 keeps it frozen; else it trains at ``lr_scale`` x the schedule's
    learning rate from step ``frozen_steps`` on (the learning rate 0 before)."""

    lr_scale: float = 0.0
    frozen_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr_scale < 0.0 or self.frozen_steps < 0:
            raise ValueError(
                f"lr_scale and frozen_steps must be >= 0, got {self.lr_scale}, {self.frozen_steps}"
            )

    @property
    def tuned(self) -> bool:
        return self.lr_scale > 0.0


@dataclass(frozen=True)
class EarlyStopping:
    """The students' stopping rule, the same for every variant: greedy exact match on the
    validation split every ``eval_every`` steps; training stops after ``patience`` evaluations
    without a gain over the best so far, or at the schedule's ``steps`` (the budget); the best
    checkpoint (the earliest one on ties) is the one evaluated on the test split."""

    eval_every: int = 200
    # 3 (600 steps) stops runs on plateaus they later leave (measured: SFT seed 0 held val
    # 0.545 from step 1600 to 2400, then rose to 0.79 by 4400; 3 ended it at 2200).
    patience: int = 5

    def __post_init__(self) -> None:
        if self.eval_every < 1 or self.patience < 1:
            raise ValueError(
                f"eval_every and patience must be >= 1, got {self.eval_every}, {self.patience}"
            )


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides a demo run's numbers.

    ``data_dir``: None trains on the generated shapes task (``task``); else a LLaVA JSON +
    image-folder dataset (``demo/data.py``), whose shared vision encoder is pretrained on its
    train images alone (no labels; the shapes task's uses its cell labels). Teacher and students
    start from it.
    The student's vision encoder has the teacher's architecture: both start from the same
    weights. ``system_prompt=False`` drops the chat system turn (about 60 tokens of 85) for speed.
    ``early_stopping`` None: every student trains exactly ``student_schedule.steps`` steps.
    """

    # Larger shapes (14 of 16 px per cell) and the last vision layer: learnt faster.
    task: ShapesTaskConfig = field(
        default_factory=lambda: ShapesTaskConfig(num_train=4000, object_fraction=0.85)
    )
    data_dir: str | None = None
    teacher: TinyVLMSpec = field(default_factory=lambda: teacher_spec(vision_feature_layer=-1))
    student: TinyVLMSpec = field(
        default_factory=lambda: student_spec(vision_layers=3, vision_feature_layer=-1)
    )
    # The shared vision encoder's pretraining: on the shapes task's cell labels, or (a dataset
    # directory) label-free, masked-patch reconstruction by ``vision_recipe``.
    vision_schedule: TrainSchedule = TrainSchedule(steps=600, learning_rate=1e-3, batch_size=32)
    vision_recipe: MaskedPatchRecipe = MaskedPatchRecipe()
    # The teacher learns the shape-binding questions (colour of / count of / is there a
    # <shape>) abruptly, and the later the higher the peak learning rate (measured): from 1e-3
    # `exists` came at step ~2400 of 3000 on transformers 5.24.0 and not by 3000 on 4.40.1;
    # from 5e-4 all three pass 90% (validation) by steps 1500-2250 on both releases.
    teacher_schedule: TrainSchedule = TrainSchedule(steps=3000, learning_rate=5e-4)
    teacher_vision: TeacherVision = TeacherVision()
    student_schedule: TrainSchedule = TrainSchedule(steps=600, learning_rate=1e-3)
    # Steps 0: students start cold (random connector and LM). Else each seed's student is first
    # warmed up with plain SFT, its vision encoder frozen (as a student whose LM and connector
    # were trained before the distillation stage), and every variant continues from there.
    student_warmup: TrainSchedule = TrainSchedule(steps=0, learning_rate=1e-3)
    early_stopping: EarlyStopping | None = None
    system_prompt: bool = False
    eval_batch_size: int = 100
    max_new_tokens: int = 3
    host: str = "auto"  # demo/hosts.py: HOSTS

    def data_key(self, content_digest: str | None) -> dict[str, Any]:
        """What identifies the data: the task's config (it decides every file the generator
        writes), or a dataset directory's content, ``content_digest`` (``check_dataset``'s
        ``DemoData.content_digest``): rewriting any of its files changes every key."""
        if self.data_dir is None:
            return {"task": dataclasses.asdict(self.task)}
        if content_digest is None:
            raise ValueError(
                f"the cache keys of {self.data_dir} follow its content: pass the content_digest "
                "that switchkd_plugin.demo.data.check_dataset returned for it"
            )
        return {"data_content": content_digest}

    def settings(self) -> dict[str, Any]:
        """The fields that decide this config's runs: a setting that does not apply (the
        label-free recipe on the shapes task, a frozen teacher's vision setting) is left out, so
        the keys of configs without it stay as they were before it existed."""
        fields = dataclasses.asdict(self)
        if self.data_dir is None:
            del fields["vision_recipe"]
        if not self.teacher_vision.tuned:
            del fields["teacher_vision"]
        return fields

    def vision_key(self, host: str, content_digest: str | None = None) -> str:
        """Hash of everything the shared vision encoder's weights depend on (transformers'
        version included: state-dict layouts differ across releases); ``host``: the resolved
        host name; ``content_digest``: as ``data_key`` takes it."""
        return stable_hash(
            {
                "version": MODEL_CACHE_VERSION,
                "transformers": transformers.__version__,
                "host": host,
                **self.data_key(content_digest),
                "teacher": dataclasses.asdict(self.teacher),
                "vision_schedule": dataclasses.asdict(self.vision_schedule),
                # Only a dataset directory's (label-free) pretraining follows the recipe.
                **(
                    {"vision_recipe": dataclasses.asdict(self.vision_recipe)}
                    if self.data_dir is not None
                    else {}
                ),
            }
        )

    def teacher_key(self, host: str, content_digest: str | None = None) -> str:
        """Hash of everything the trained teacher depends on."""
        return stable_hash(
            {
                "vision": self.vision_key(host, content_digest),
                "schedule": dataclasses.asdict(self.teacher_schedule),
                "system_prompt": self.system_prompt,
                # Only when tuned: a frozen teacher keeps the key it had before this setting.
                **(
                    {"teacher_vision": dataclasses.asdict(self.teacher_vision)}
                    if self.teacher_vision.tuned
                    else {}
                ),
            }
        )

    def student_key(self, host: str, seed: int, content_digest: str | None = None) -> str:
        """Hash of everything a warmed-up student of ``seed`` depends on."""
        return stable_hash(
            {
                "vision": self.vision_key(host, content_digest),
                "student": dataclasses.asdict(self.student),
                "warmup": dataclasses.asdict(self.student_warmup),
                "system_prompt": self.system_prompt,
                "seed": seed,
            }
        )


# --teacher-tunes-vision: the teacher trains its vision encoder in its own SFT (TinyLLaVA's
# recipes that tune the vision tower), at a rate that keeps it strong (measured: docs/demo.md).
TUNED_TEACHER_VISION = TeacherVision(lr_scale=0.1, frozen_steps=0)
# The built-in default: fits in 5 minutes on 2 CPU cores with an empty cache.
DEFAULT_CONFIG = DemoConfig()
# The CI smoke run: well under a minute.
SMOKE_CONFIG = DemoConfig(
    task=ShapesTaskConfig(num_train=400, num_val=0, num_test=400, object_fraction=0.85),
    vision_schedule=TrainSchedule(steps=100, learning_rate=1e-3, batch_size=32),
    teacher_schedule=TrainSchedule(steps=400, learning_rate=1e-3),
    student_schedule=TrainSchedule(steps=10, learning_rate=1e-3, logging_steps=5),
)
