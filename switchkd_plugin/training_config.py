"""`SwitchKDConfig`: `TrainingArguments` that carry the Switch-KD settings, as TRL's configs do.

The Trainer pickles its arguments into every checkpoint (`training_args.bin`), so the settings
travel with the run, and resuming compares them (`switchkd_plugin.resume.check_resume_settings`).
The Factory keeps `SwitchKDArguments` beside its own `TrainingArguments`.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from .config import SwitchKDArguments


@dataclass
class SwitchKDConfig(SwitchKDArguments, TrainingArguments):
    """`TrainingArguments` plus every `SwitchKDArguments` field (each defined once, there).

    The dataclass lists `TrainingArguments`' fields first (its required `output_dir` on 4.x
    included), then Switch-KD's, which all have defaults. Pass it as `args=` to
    `SwitchKDTrainer`, without `switchkd_args=`.
    """

    def __post_init__(self) -> None:
        SwitchKDArguments.__post_init__(self)  # ours first: cheap, and before any device set-up
        TrainingArguments.__post_init__(self)
