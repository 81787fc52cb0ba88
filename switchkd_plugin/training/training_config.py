"""`SwitchKDConfig`: `TrainingArguments` that carry the Switch-KD settings, as TRL's configs do.

One parsed object holds the whole run's settings. Whichever way they are passed (this config, or
`switchkd_args=` beside plain `TrainingArguments`, as the Factory does), every checkpoint records
the Switch-KD settings in `switchkd_config.json`, and resuming compares them
(`switchkd_plugin.training.resume.check_resume_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from switchkd_plugin.config import SwitchKDArguments


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
