"""Model families the demo runs on (``DemoHost``): build a model from a spec, read a split of the
shapes task, collate, make left-padded generation prompts, and name the Trainer to train with.

``hf_llava`` is transformers' ``LlavaForConditionalGeneration``; ``tinyllava`` is TinyLLaVA
Factory's ``TinyLlavaForConditionalGeneration`` with the Factory's own data pipeline and
``LLaVATrainer``. ``auto`` picks the Factory when it is importable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import transformers
from torch import nn
from torch.utils.data import Dataset

from switchkd_plugin import SwitchKDTrainer, switchkd_trainer_class
from switchkd_plugin.demo.hf_data import LlavaCollator, LlavaJsonDataset, chat_format_for
from switchkd_plugin.demo.shapes import (
    FACTORY_CONV_VERSION,
    LlavaDatasetPaths,
    Split,
    load_records,
    parse_record,
)
from switchkd_plugin.integrations.tinyllava.compat import factory_import_error, import_tinyllava
from switchkd_plugin.testing.tiny_models import TinyVLMSpec, build_hf_llava, build_tinyllava

if TYPE_CHECKING:
    from tinyllava.data.dataset import LazySupervisedDataset

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
        return {
            "input_ids": _left_pad(
                [item["input_ids"][0] for item in items], dataset.tokenizer.pad_token_id
            ),
            "attention_mask": _left_pad([item["attention_mask"][0] for item in items], 0),
            "pixel_values": torch.cat([item["pixel_values"] for item in items]),
        }

    def trainer_class(self) -> type[transformers.Trainer]:
        return SwitchKDTrainer

    def training_arguments_class(self) -> type[transformers.TrainingArguments]:
        return transformers.TrainingArguments


def _left_pad(rows: Sequence[torch.Tensor], value: int) -> torch.Tensor:
    """[n][T_i] -> [n, max T_i], each row padded with ``value`` on the left."""
    width = max(len(row) for row in rows)
    return torch.stack(
        [torch.nn.functional.pad(row, (width - len(row), 0), value=value) for row in rows]
    )


@contextlib.contextmanager
def _component_dir() -> Iterator[Path]:
    """A new directory for one build's component files, removed afterwards.

    The Factory picks the LLM and vision classes by the names found in these files' paths ("phi",
    "clip", ...): the name is digits only, where ``tempfile.mkdtemp``'s random letters could
    spell one.
    """
    parent = Path(tempfile.gettempdir())
    for attempt in itertools.count():
        path = parent / f"switchkd-tinyllava-{os.getpid()}-{attempt}"
        try:
            path.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class FactoryShapesDataset(Dataset):
    """One split of the shapes task read by TinyLLaVA Factory's own ``LazySupervisedDataset``
    (``FACTORY_CONV_VERSION`` template, the model's image processor and tokenizer).

    Items are the Factory's: ``input_ids`` [T] with one ``IMAGE_TOKEN_INDEX`` (-200) for the
    image, ``labels`` [T] (the answer and its ``<|im_end|>`` supervised), ``image`` [3, H, W].
    ``question_type(i)``, ``answer(i)``, ``tokenizer`` and ``len()`` are ``LlavaJsonDataset``'s.
    """

    def __init__(
        self, factory_dataset: LazySupervisedDataset, records: list[dict[str, Any]]
    ) -> None:
        self.factory_dataset = factory_dataset
        self.records = records

    @property
    def tokenizer(self) -> transformers.PreTrainedTokenizerBase:
        """The tokenizer the Factory's model loaded (and the dataset encodes with)."""
        return self.factory_dataset.tokenizer

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.factory_dataset[i]

    def answer(self, i: int) -> str:
        return parse_record(self.records[i])[1]

    def question_type(self, i: int) -> str:
        return self.records[i]["question_type"]

    def generation_inputs(self, i: int) -> dict[str, torch.Tensor]:
        """The Factory's generation prompt of sample ``i``, as its ``run_tiny_llava`` makes one:
        the template up to the assistant turn (``... ASSISTANT:``, the answer's ids follow).

        ``input_ids`` [T] (one -200 for the image), ``images`` [3, H, W].
        """
        from tinyllava.utils.message import Message

        message = Message()
        message.add_message(self.records[i]["conversations"][0]["value"])
        text = self.factory_dataset.text_preprocess(message.messages, mode="eval")
        return {"input_ids": text["input_ids"], "images": self.factory_dataset[i]["image"]}


@functools.cache
def _switchkd_llava_trainer() -> type[transformers.Trainer]:
    """One class for the process: Trainer classes made by each call would differ."""
    import_tinyllava()
    from tinyllava.train.tinyllava_trainer import LLaVATrainer

    return switchkd_trainer_class(LLaVATrainer)


@dataclass(frozen=True)
class TinyLlavaHost:
    """TinyLLaVA Factory's ``TinyLlavaForConditionalGeneration`` (tiny Qwen2 + SigLIP), built,
    fed, collated and trained by the Factory's own code: ``LazySupervisedDataset``,
    ``DataCollatorForSupervisedDataset``, its chat template and ``LLaVATrainer``.

    Models re-pad their rows on the left after splicing the image features in (the Factory's
    ``tokenizer_padding_side="left"``): greedy decoding reads each row's last position, which
    after a right re-pad is padding in every row shorter than the longest. Training is the same
    either way, up to rounding: the Factory passes no position ids, and rotary attention only
    sees offsets between positions, which left padding does not change.

    The connector reads every SigLIP patch (``mm_vision_select_feature="cls_patch"``; the
    Factory's default ``"patch"`` drops the first token as a CLS token, which SigLIP does not
    have), as the ``hf_llava`` host's ``"full"`` strategy does.
    """

    system_prompt: bool = False
    name: str = "tinyllava"
    label: str = (
        "TinyLLaVA Factory path (TinyLlavaForConditionalGeneration, the Factory's data pipeline "
        "and LLaVATrainer)"
    )

    def build(self, spec: TinyVLMSpec, tokenizer: Any) -> nn.Module:
        # The component files are read during the build only (the tokenizer included); the
        # Factory prints their soon-deleted paths.
        with _component_dir() as workdir, contextlib.redirect_stdout(io.StringIO()):
            return build_tinyllava(
                spec, tokenizer, workdir, padding_side="left", select_feature="cls_patch"
            )

    def dataset(
        self, model: nn.Module, tokenizer: Any, paths: LlavaDatasetPaths, split: Split
    ) -> FactoryShapesDataset:
        """The split as the Factory's ``train()`` reads data, with ``model.tokenizer`` (the slow
        tokenizer the Factory loaded from ``tokenizer``'s files). ``system_prompt=False`` empties
        the template's system formatter (one of its dataclass fields): the label masking counts
        the tokens of each turn, so it still supervises exactly the answer."""
        from tinyllava.data.dataset import LazySupervisedDataset
        from tinyllava.data.template.formatter import EmptyFormatter
        from tinyllava.utils.arguments import DataArguments

        data_args = DataArguments(
            data_path=str(paths.split(split)),
            image_folder=str(paths.image_folder),
            conv_version=FACTORY_CONV_VERSION,
            image_aspect_ratio=model.config.image_aspect_ratio,
            is_multimodal=True,
        )
        data_args.image_processor = model.vision_tower._image_processor  # as train() sets it
        factory_dataset = LazySupervisedDataset(
            data_path=data_args.data_path, tokenizer=model.tokenizer, data_args=data_args
        )
        if not self.system_prompt:
            text = factory_dataset.text_preprocess
            text.template = dataclasses.replace(text.template, system=EmptyFormatter(slot=""))
        return FactoryShapesDataset(factory_dataset, load_records(data_args.data_path))

    def collator(self, tokenizer: Any) -> Callable[[Sequence[dict]], dict]:
        """The Factory's ``DataCollatorForSupervisedDataset``: right-pads ``input_ids`` [B, T]
        and ``labels`` [B, T], bool ``attention_mask`` [B, T], stacks ``images`` [B, 3, H, W].

        It truncates to ``tokenizer.model_max_length`` (the demo's tokenizer sets none); the
        model truncates its spliced rows to ``spec.max_length``."""
        from tinyllava.data.dataset import DataCollatorForSupervisedDataset

        return DataCollatorForSupervisedDataset(tokenizer=tokenizer)

    def prompts(
        self, dataset: FactoryShapesDataset, indices: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` [n, T] left-padded, ``attention_mask`` [n, T] (long), ``images``
        [n, 3, H, W]."""
        items = [dataset.generation_inputs(i) for i in indices]
        ids = [item["input_ids"] for item in items]
        return {
            "input_ids": _left_pad(ids, dataset.tokenizer.pad_token_id),
            "attention_mask": _left_pad([torch.ones_like(row) for row in ids], 0),
            "images": torch.stack([item["images"] for item in items]),
        }

    def trainer_class(self) -> type[transformers.Trainer]:
        """``switchkd_trainer_class(LLaVATrainer)``: the Factory's sampler and optimizer
        parameter groups; at the defaults of its ``TrainingArguments`` (no ``mm_projector_lr``,
        no ``group_by_modality_length``) the same AdamW groups, learning rate and sampling as
        transformers' ``Trainer``."""
        return _switchkd_llava_trainer()

    def training_arguments_class(self) -> type[transformers.TrainingArguments]:
        """The Factory's ``TrainingArguments`` (``tinyllava.utils.arguments``)."""
        import_tinyllava()
        from tinyllava.utils.arguments import TrainingArguments

        return TrainingArguments


def host_for(name: str, *, system_prompt: bool = False) -> DemoHost:
    """The ``DemoHost`` called ``name`` (one of ``HOSTS``); ``"auto"`` is ``"tinyllava"`` when
    TinyLLaVA Factory is importable, else ``"hf_llava"``.

    Raises ``ImportError`` for ``"tinyllava"`` when the Factory cannot be imported.
    """
    if name not in HOSTS:
        raise ValueError(f"unknown host {name!r}; expected one of {', '.join(HOSTS)}")
    if name == "hf_llava":
        return HFLlavaHost(system_prompt=system_prompt)
    error = factory_import_error()
    if error is None:
        return TinyLlavaHost(system_prompt=system_prompt)
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if name == "auto":
        if importlib.util.find_spec("tinyllava") is not None:  # there, but broken: say why
            warnings.warn(
                f"TinyLLaVA Factory is on the path but does not import ({reason}); the demo "
                "takes the transformers LLaVA path instead",
                stacklevel=2,
            )
        return HFLlavaHost(system_prompt=system_prompt)
    raise ImportError(
        f"the tinyllava host needs TinyLLaVA Factory importable, and it is not "
        f"({reason}): put a TinyLLaVA Factory checkout on PYTHONPATH, "
        "with peft and deepspeed installed (see docs/tinyllava.md), or use the hf_llava host"
    ) from error
