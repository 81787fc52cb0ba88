"""What every student run of one config shares: the outputs of the data, vision and teacher
stages, and how to read and score a split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from switchkd_plugin.demo.config import DemoConfig
from switchkd_plugin.demo.data import DemoData
from switchkd_plugin.demo.evaluation import Accuracy, evaluate
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.demo.shapes import Split


@dataclass
class DemoContext:
    """Host, tokenizer, data, the shared vision encoder's weights (the students start from
    them), the trained teacher, the cache."""

    config: DemoConfig
    host: DemoHost
    tokenizer: Any
    data: DemoData
    vision_state: dict[str, torch.Tensor]
    teacher: nn.Module
    cache_dir: Path

    @property
    def work_dir(self) -> Path:
        """Where the Trainers' (empty: nothing is saved) output directories go."""
        return self.cache_dir / "runs"

    @property
    def max_new_tokens(self) -> int:
        """Enough greedy tokens for the longest answer and its end-of-turn token."""
        longest = max(
            len(self.tokenizer(f" {answer}", add_special_tokens=False).input_ids)
            for answers in self.data.answers.values()
            for answer in answers
        )
        return max(self.config.max_new_tokens, longest + 1)

    def split(self, model: nn.Module, split: Split) -> Any:
        return self.host.dataset(model, self.tokenizer, self.data.paths, split)

    def evaluate(self, model: nn.Module, description: str, split: Split = "test") -> Accuracy:
        """Greedy exact-match accuracy on ``split``, per question type and overall."""
        return evaluate(
            self.host,
            model,
            self.split(model, split),
            self.data.question_types,
            batch_size=self.config.eval_batch_size,
            max_new_tokens=self.max_new_tokens,
            description=description,
        )
