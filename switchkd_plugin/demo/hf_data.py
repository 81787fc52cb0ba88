"""The shapes task on the transformers path: dataset, collator, prompts and scoring for
``transformers.LlavaForConditionalGeneration`` with the tiny tokenizer.

It reads the same LLaVA JSON + image folder that TinyLLaVA Factory reads (``write_llava_dataset``)
and formats each sample as a ChatML conversation::

    <|im_start|>system\\n{system prompt}<|im_end|>\\n
    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n {answer}<|im_end|>

The answer follows a space, so it is the same token(s) as after the Factory's ``ASSISTANT: ``:
the supervised ids (answer + ``<|im_end|>``) are identical on both paths. ``<image>`` appears once
or ``image_tokens`` times (pre-expanded to the vision feature count): transformers <= 4.44 expands
one placeholder inside the model, >= 4.48 requires them expanded (``chat_format_for`` picks).

Images become ``pixel_values`` as SigLIP's image processor makes them: RGB, bicubic resize to the
vision tower's size when needed, scaled to [0, 1], normalised with mean = std = 0.5.
"""

from __future__ import annotations

import os
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.data import Dataset

from switchkd_plugin.demo.shapes import load_records, parse_record
from switchkd_plugin.testing.tiny_models import (
    EOS_TOKEN,
    IGNORE_INDEX,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    SYSTEM_PROMPT,
    hf_image_token_conventions,
)

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5


@dataclass(frozen=True)
class ChatFormat:
    """How a sample becomes text: ``image_tokens`` ``<image>`` placeholders per image, and the
    system turn (``None``: none)."""

    image_tokens: int = 1
    system_prompt: str | None = SYSTEM_PROMPT

    def __post_init__(self) -> None:
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {self.image_tokens}")

    def prompt(self, question: str) -> str:
        """Everything up to and including the assistant header: the generation prompt."""
        system = ""
        if self.system_prompt is not None:
            system = f"{IM_START_TOKEN}system\n{self.system_prompt}{EOS_TOKEN}\n"
        user = f"{IM_START_TOKEN}user\n{IMAGE_TOKEN * self.image_tokens}\n{question}{EOS_TOKEN}\n"
        return f"{system}{user}{IM_START_TOKEN}assistant\n"

    def response(self, answer: str) -> str:
        """The supervised part: the answer after a space, then the end-of-turn token."""
        return f" {answer}{EOS_TOKEN}"


def chat_format_for(model: transformers.LlavaForConditionalGeneration, **kwargs: Any) -> ChatFormat:
    """The ``ChatFormat`` whose image placeholders ``model``'s forward accepts: one per image
    where the installed transformers expands it, else one per vision feature."""
    if "expanded" not in hf_image_token_conventions(model):
        return ChatFormat(image_tokens=1, **kwargs)
    vision = model.config.vision_config
    # SigLIP has no CLS token; LLaVA's "default" strategy drops the first feature anyway.
    dropped = int(model.config.vision_feature_select_strategy == "default")
    features = (vision.image_size // vision.patch_size) ** 2 - dropped
    return ChatFormat(image_tokens=features, **kwargs)


def load_pixel_values(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """[3, image_size, image_size] float32 ``pixel_values`` of one image file."""
    image = Image.open(path).convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - SIGLIP_MEAN) / SIGLIP_STD


def normalise_answer(text: str) -> str:
    """Lowercase, punctuation removed, whitespace collapsed: ``" Red.\\n"`` -> ``"red"``."""
    without_punctuation = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(without_punctuation.split())


def exact_match(prediction: str, answer: str) -> bool:
    """Whether ``prediction`` equals ``answer`` after ``normalise_answer``."""
    return normalise_answer(prediction) == normalise_answer(answer)


@dataclass(frozen=True)
class _EncodedSample:
    """One sample, tokenised and decoded: ``prompt_ids`` [P], ``response_ids`` [R],
    ``pixel_values`` [3, H, W]. Kept for the dataset's life: callers get copies."""

    prompt_ids: torch.Tensor
    response_ids: torch.Tensor
    pixel_values: torch.Tensor


class LlavaJsonDataset(Dataset):
    """One split of a LLaVA JSON file + image folder, tokenised for HF LLaVA.

    Items: ``input_ids`` [T] and ``labels`` [T] (``IGNORE_INDEX`` except the answer and its
    ``<|im_end|>``), ``pixel_values`` [3, image_size, image_size].
    """

    def __init__(
        self,
        json_path: str | os.PathLike,
        image_folder: str | os.PathLike,
        tokenizer: transformers.PreTrainedTokenizerBase,
        *,
        chat: ChatFormat | None = None,
        image_size: int = 32,
    ) -> None:
        self.records = load_records(json_path)
        self.image_folder = Path(image_folder)
        self.tokenizer = tokenizer
        self.chat = chat or ChatFormat()
        self.image_size = image_size
        self._image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # Each sample is encoded once: training makes many epochs over the split and the
        # replication scores the val split every few hundred steps (decoding the image and
        # tokenising took a sixth of a small teacher's training step).
        self._encoded: dict[int, _EncodedSample] = {}

    def __len__(self) -> int:
        return len(self.records)

    def question(self, i: int) -> str:
        return parse_record(self.records[i])[0]

    def answer(self, i: int) -> str:
        return parse_record(self.records[i])[1]

    def question_type(self, i: int) -> str:
        return self.records[i]["question_type"]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _encode_sample(self, i: int) -> _EncodedSample:
        if i in self._encoded:
            return self._encoded[i]
        prompt = self._encode(self.chat.prompt(self.question(i)))
        if prompt.count(self._image_token_id) != self.chat.image_tokens:
            raise ValueError(
                f"the tokenizer turned {self.chat.image_tokens} {IMAGE_TOKEN} placeholders into "
                f"{prompt.count(self._image_token_id)} image token ids: is {IMAGE_TOKEN} one of "
                "its special tokens?"
            )
        sample = _EncodedSample(
            prompt_ids=torch.tensor(prompt),
            response_ids=torch.tensor(self._encode(self.chat.response(self.answer(i)))),
            pixel_values=load_pixel_values(
                self.image_folder / self.records[i]["image"], self.image_size
            ),
        )
        self._encoded[i] = sample
        return sample

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        sample = self._encode_sample(i)
        ignored = torch.full_like(sample.prompt_ids, IGNORE_INDEX)
        return {
            "input_ids": torch.cat([sample.prompt_ids, sample.response_ids]),
            "labels": torch.cat([ignored, sample.response_ids]),
            "pixel_values": sample.pixel_values.clone(),
        }

    def generation_inputs(self, i: int) -> dict[str, torch.Tensor]:
        """A batch of one for ``model.generate``: the prompt up to the assistant header.

        ``input_ids`` [1, T], ``attention_mask`` [1, T], ``pixel_values`` [1, 3, H, W].
        """
        sample = self._encode_sample(i)
        return {
            "input_ids": sample.prompt_ids[None].clone(),
            "attention_mask": torch.ones_like(sample.prompt_ids)[None],
            "pixel_values": sample.pixel_values[None].clone(),
        }


@dataclass(frozen=True)
class LlavaCollator:
    """Right-pads ``LlavaJsonDataset`` items into a batch.

    Output: ``input_ids`` [B, T] (``pad_token_id`` padding), ``attention_mask`` [B, T] (long),
    ``labels`` [B, T] (``IGNORE_INDEX`` padding), ``pixel_values`` [B, 3, H, W].
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        def pad(key: str, value: int) -> torch.Tensor:
            rows = [item[key] for item in items]
            return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=value)

        lengths = torch.tensor([len(item["input_ids"]) for item in items])
        positions = torch.arange(int(lengths.max()))
        return {
            "input_ids": pad("input_ids", self.pad_token_id),
            "attention_mask": (positions[None, :] < lengths[:, None]).long(),
            "labels": pad("labels", IGNORE_INDEX),
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        }
