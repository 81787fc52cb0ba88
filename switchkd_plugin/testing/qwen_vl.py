"""Tiny offline Qwen2.5-VL and Qwen3-VL models, their tokenizer, image processor, processor and
batches, for tests and the examples.

As in the real families, the sizes of one line share the vision encoder (``QwenVisionSpec``) and
differ in the language model (``TinyVLMSpec``'s LM fields: ``teacher_spec()`` /
``student_spec()``). Images are 32 x 32 px, 4 px patches, 2 x 2 merge: 64 ViT tokens and 16
image tokens per image; Qwen2.5-VL's attention windows cover 2 x 2 merged tokens, so its window
order differs from raster order.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import transformers

from switchkd_plugin.testing.tiny_models import (
    IGNORE_INDEX,
    TinyVLMSpec,
    _seeded,
    build_tokenizer,
    lm_config_fields,
    make_conversations,
)

Family = Literal["qwen2_5_vl", "qwen3_vl"]
FAMILIES: tuple[Family, ...] = ("qwen2_5_vl", "qwen3_vl")

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
IMAGE_SIZE = 32

# A Qwen-style chat template (system turn omitted): what the processor (and TRL) render.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class QwenVisionSpec:
    """The ViT a family line shares (``vision_config``)."""

    depth: int = 2
    hidden_size: int = 32
    num_heads: int = 2
    intermediate_size: int = 64
    patch_size: int = 4
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 16  # Qwen2.5-VL, in pixels: 2 x 2 merged tokens per window
    deepstack_visual_indexes: tuple[int, ...] = (0,)  # Qwen3-VL
    seed: int = 3

    def vision_config(self, family: Family, out_hidden_size: int) -> dict:
        config = dict(
            depth=self.depth,
            hidden_size=self.hidden_size,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            patch_size=self.patch_size,
            spatial_merge_size=self.spatial_merge_size,
            temporal_patch_size=self.temporal_patch_size,
            out_hidden_size=out_hidden_size,
        )
        if family == "qwen2_5_vl":
            config.update(window_size=self.window_size, fullatt_block_indexes=[self.depth - 1])
        else:
            grid = IMAGE_SIZE // self.patch_size
            config.update(
                num_position_embeddings=grid * grid,
                deepstack_visual_indexes=list(self.deepstack_visual_indexes),
            )
        return config


def build_qwen_vl_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The tiny byte-level BPE (``build_tokenizer``) plus Qwen's vision tokens."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(VISION_TOKENS), special_tokens=True)
    return tokenizer


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim / 2 rotary frequencies over (temporal, height, width), as Qwen's 16/24/24."""
    half = head_dim // 2
    temporal = half - 2 * (3 * half // 8)
    return [temporal, 3 * half // 8, 3 * half // 8]


def qwen_vl_config(
    family: Family,
    spec: TinyVLMSpec,
    tokenizer: transformers.PreTrainedTokenizerBase,
    vision: QwenVisionSpec = QwenVisionSpec(),
):
    """The family's config: the spec's LM on the line's shared ViT."""
    text = lm_config_fields(
        spec,
        tokenizer,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(spec.head_dim),
            **({"mrope_interleaved": True} if family == "qwen3_vl" else {}),
        },
    )
    if family == "qwen3_vl":
        text["head_dim"] = spec.head_dim
    config_class = (
        transformers.Qwen2_5_VLConfig if family == "qwen2_5_vl" else transformers.Qwen3VLConfig
    )
    ids = tokenizer.convert_tokens_to_ids
    return config_class(
        text_config=text,
        vision_config=vision.vision_config(family, spec.hidden_size),
        image_token_id=ids(IMAGE_PAD),
        video_token_id=ids(VIDEO_PAD),
        vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END),
        tie_word_embeddings=False,
    )


def build_qwen_vl(
    family: Family,
    spec: TinyVLMSpec,
    tokenizer: transformers.PreTrainedTokenizerBase,
    vision: QwenVisionSpec = QwenVisionSpec(),
) -> torch.nn.Module:
    """A randomly initialised fp32 ``Qwen2_5_VLForConditionalGeneration`` /
    ``Qwen3VLForConditionalGeneration``. The ViT starts from ``vision.seed`` (the line's
    shared encoder: equal in teacher and student); the rest from ``spec.seed``."""
    model_class = (
        transformers.Qwen2_5_VLForConditionalGeneration
        if family == "qwen2_5_vl"
        else transformers.Qwen3VLForConditionalGeneration
    )
    config = qwen_vl_config(family, spec, tokenizer, vision)
    with _seeded(spec.seed):
        model = model_class._from_config(config, attn_implementation=spec.attn_implementation)
    own = model.model.visual
    # the line's ViT, initialised from a config that does not depend on the LM width
    shared_config = copy.deepcopy(config.vision_config)
    shared_config.out_hidden_size = vision.hidden_size
    with _seeded(vision.seed):
        shared = type(own)._from_config(shared_config)
    # the line's shared ViT: patch embedding, positions, blocks (the mergers are the model's own)
    for name, module in shared.named_children():
        if "merger" not in name:
            getattr(own, name).load_state_dict(module.state_dict())
    return model.float()


def build_image_processor(vision: QwenVisionSpec = QwenVisionSpec()):
    """Qwen2-VL's image processor (PIL backend, no torchvision) for 32 x 32 images."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    pixels = IMAGE_SIZE * IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size,
        min_pixels=pixels,
        max_pixels=pixels,
    )


def build_processor(
    family: Family,
    tokenizer: transformers.PreTrainedTokenizerBase,
    vision: QwenVisionSpec = QwenVisionSpec(),
):
    """The family's processor for images (image processor + tokenizer + chat template).

    transformers 5 requires a processor's video processor, and every video processor needs
    torchvision (not installable beside a CPU torch here), so this is the family's processor
    class with the video processor left out of its signature: images and text are processed
    by the family's own code.
    """
    family_class = (
        transformers.Qwen2_5_VLProcessor
        if family == "qwen2_5_vl"
        else transformers.Qwen3VLProcessor
    )

    class ImageProcessorOnly(family_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # ProcessorMixin reads the sub-processors from this signature: no video processor
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    ImageProcessorOnly.__name__ = ImageProcessorOnly.__qualname__ = (
        f"ImageOnly{family_class.__name__}"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return ImageProcessorOnly(
        image_processor=build_image_processor(vision),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


def make_images(n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list:
    """``n`` random RGB PIL images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)
    ]


def make_qwen_vl_batch(
    tokenizer: transformers.PreTrainedTokenizerBase,
    n: int = 2,
    seed: int = 0,
    *,
    vision: QwenVisionSpec = QwenVisionSpec(),
    padding_side: Literal["right", "left"] = "right",
    text_only_rows: tuple[int, ...] = (),
) -> dict[str, torch.Tensor]:
    """A collated batch as the Qwen processor makes it, built from its image processor and the
    tokenizer (so it needs no torchvision): one image per sample (none for ``text_only_rows``),
    ``<|image_pad|>`` repeated once per merged token, answers of different lengths.

    Keys: ``input_ids``, ``attention_mask``, ``labels`` (-100 except the answer and its
    ``<|im_end|>``), ``mm_token_type_ids`` (1 on image tokens) [n, T]; ``pixel_values``
    [N_patches, 3 * T * p * p] and ``image_grid_thw`` [n_images, 3].
    """
    image_processor = build_image_processor(vision)
    with_image = [i for i in range(n) if i not in text_only_rows]
    images = {}  # the image processor refuses an empty list: a text-only batch has no images
    if with_image:
        images = image_processor(make_images(len(with_image), seed), return_tensors="pt")
    grids = iter(images["image_grid_thw"].tolist() if with_image else [])
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    rows, labels = [], []
    for i, (question, answer) in enumerate(make_conversations(n, seed)):
        image = ""
        if i in with_image:
            tokens = math.prod(next(grids)) // vision.spatial_merge_size**2
            image = VISION_START + IMAGE_PAD * tokens + VISION_END
        prompt = tokenizer(
            f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"
        ).input_ids
        response = tokenizer(f"{answer}<|im_end|>").input_ids
        rows.append(prompt + response)
        labels.append([IGNORE_INDEX] * len(prompt) + response)
    width = max(len(row) for row in rows)

    def pad(row: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(row))
        return fill + row if padding_side == "left" else row + fill

    input_ids = torch.tensor([pad(row, tokenizer.pad_token_id) for row in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([pad([1] * len(row), 0) for row in rows]),
        "labels": torch.tensor([pad(row, IGNORE_INDEX) for row in labels]),
        "mm_token_type_ids": (input_ids == image_id).long(),
    }
    if with_image:
        batch["pixel_values"] = images["pixel_values"]
        batch["image_grid_thw"] = images["image_grid_thw"]
    return batch
