"""Model families the demo runs on (``DemoHost``): build a model from a spec, read a split of the
shapes task, collate, make left-padded generation prompts, and name the Trainer to train with.

``hf_llava`` is transformers' ``LlavaForConditionalGeneration``; ``tinyllava`` is TinyLLaVA
Factory's ``TinyLlavaForConditionalGeneration`` with the Factory's own data pipeline and
``LLaVATrainer``. ``auto`` picks the Factory when it is importable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset

from switchkd_plugin.demo.hf_data import LlavaCollator, LlavaJsonDataset, chat_format_for
from switchkd_plugin.demo.shapes import LlavaDatasetPaths, Split
from switchkd_plugin.testing.tiny_models import TinyVLMSpec, build_hf_llava
from switchkd_plugin.trainer import SwitchKDTrainer

HOSTS = ("auto", "hf_llava", "tinyllava")


class DemoHost(Protocol):
    """What the pipeline needs from a model family."""

    name: str  # the resolved host name (part of the teacher's cache key)
    label: str  # printed: which path the demo runs on

    def build(self, spec: TinyVLMSpec, tokenizer: Any) -> nn.Module:
        """A randomly initialised fp32 model from ``spec`` (seeded by ``spec.seed``)."""
        ...

    def dataset(
        self, model: nn.Module, tokenizer: Any, paths: LlavaDatasetPaths, split: Split
    ) -> Dataset:
        """One split; items are training samples, ``.question_type(i)`` / ``.answer(i)`` give
        the ground truth."""
        ...

    def collator(self, tokenizer: Any) -> Callable[[Sequence[dict]], dict]: ...

    def prompts(self, dataset: Dataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Left-padded generation prompts of ``indices``, the images under the adapter's key."""
        ...

    def trainer_class(self) -> type[transformers.Trainer]:
        """The ``SwitchKDTrainer`` (or a Switch-KD subclass of the family's own Trainer)."""
        ...

    def training_arguments_class(self) -> type[transformers.TrainingArguments]:
        """The ``TrainingArguments`` class ``trainer_class()`` expects."""
        ...


@dataclass(frozen=True)
class HFLlavaHost:
    """transformers' ``LlavaForConditionalGeneration`` (tiny Qwen2 + SigLIP)."""

    system_prompt: bool = False
    name: str = "hf_llava"
    label: str = "transformers LLaVA path (LlavaForConditionalGeneration)"

    def build(self, spec: TinyVLMSpec, tokenizer: Any) -> nn.Module:
        return build_hf_llava(spec, tokenizer)

    def dataset(
        self, model: nn.Module, tokenizer: Any, paths: LlavaDatasetPaths, split: Split
    ) -> LlavaJsonDataset:
        kwargs = {} if self.system_prompt else {"system_prompt": None}
        return LlavaJsonDataset(
            paths.split(split),
            paths.image_folder,
            tokenizer,
            chat=chat_format_for(model, **kwargs),
            image_size=model.config.vision_config.image_size,
        )

    def collator(self, tokenizer: Any) -> LlavaCollator:
        return LlavaCollator(pad_token_id=tokenizer.pad_token_id)

    def prompts(self, dataset: LlavaJsonDataset, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        items = [dataset.generation_inputs(i) for i in indices]
        width = max(item["input_ids"].shape[1] for item in items)
        pad = dataset.tokenizer.pad_token_id

        def left_pad(row: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(row, (width - row.shape[1], 0), value=value)

        return {
            "input_ids": torch.cat([left_pad(item["input_ids"], pad) for item in items]),
            "attention_mask": torch.cat([left_pad(item["attention_mask"], 0) for item in items]),
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
        }

    def trainer_class(self) -> type[transformers.Trainer]:
        return SwitchKDTrainer

    def training_arguments_class(self) -> type[transformers.TrainingArguments]:
        return transformers.TrainingArguments


def host_for(name: str, *, system_prompt: bool = False) -> DemoHost:
    """The ``DemoHost`` called ``name`` (one of ``HOSTS``)."""
    if name == "hf_llava":
        return HFLlavaHost(system_prompt=system_prompt)
    if name in ("tinyllava", "auto"):
        raise NotImplementedError("the TinyLLaVA Factory host of the demo is not built yet")
    raise ValueError(f"unknown host {name!r}; expected one of {', '.join(HOSTS)}")
