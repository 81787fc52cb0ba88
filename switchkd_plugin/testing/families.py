"""Tiny offline models and batches of the transformers VLM families with pre-expanded image
tokens: LLaVA-OneVision, InternVL, Gemma 3, SmolVLM.

Models are the real transformers classes built from configs (random weights, seeded), sized by a
``TinyVLMSpec``; the tokenizer is the tiny byte-level BPE of ``tiny_models`` plus the family's
image tokens. Batches are laid out as the family's processor lays them out (its image tokens,
repeated as often as the host's own image features require, wrapped in the family's begin/end
tokens; the family's extra image inputs), with the answer supervised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import torch
import transformers

from switchkd_plugin.testing.tiny_models import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    TinyVLMSpec,
    _encode_sample,
    _pad,
    _seeded,
    build_tokenizer,
    lm_config_fields,
    make_conversations,
    qwen2_config,
    siglip_vision_config,
    vision_config_fields,
)

Family = Literal["llava_onevision", "internvl", "gemma3", "smolvlm"]
FAMILIES: tuple[Family, ...] = ("llava_onevision", "internvl", "gemma3", "smolvlm")

HOST_CLASSES: dict[Family, str] = {
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
}

# The family's image tokens, named as in its processor.
FAMILY_TOKENS: dict[Family, dict[str, str]] = {
    "llava_onevision": {"image": IMAGE_TOKEN, "video": "<video>"},
    "internvl": {"image": "<IMG_CONTEXT>", "start": "<img>", "end": "</img>"},
    "gemma3": {"image": "<image_soft_token>", "start": "<start_of_image>", "end": "<end_of_image>"},
    "smolvlm": {"image": IMAGE_TOKEN, "start": "<fake_token_around_image>", "end": "<global-img>"},
}

# Image side in pixels (patch 8): 4 x 4 patches per OneVision crop; 8 x 8 elsewhere, so that
# InternVL's and SmolVLM's pixel shuffle and Gemma 3's pooling leave 16 tokens per image.
IMAGE_SIZES: dict[Family, int] = {
    "llava_onevision": 32,
    "internvl": 64,
    "gemma3": 64,
    "smolvlm": 64,
}
ONEVISION_GRID = [[32, 32], [32, 64], [64, 32], [64, 64]]
ZERO_INITIALISED: dict[Family, tuple[str, ...]] = {
    "gemma3": ("model.multi_modal_projector.mm_input_projection_weight",),
    "internvl": (
        "model.vision_tower.embeddings.cls_token",
        "model.vision_tower.embeddings.position_embeddings",
    ),
}


def family_host_class(family: Family) -> type | None:
    """The family's transformers class, None on releases without it."""
    return getattr(transformers, HOST_CLASSES[family], None)


def family_skip_reason(family: Family) -> str | None:
    """Why the family cannot be tested on the installed transformers (None: it can)."""
    if family_host_class(family) is None:
        return (
            f"transformers {transformers.__version__} has no {HOST_CLASSES[family]} "
            "(the family came in a later release)"
        )
    return None


def build_family_tokenizer(family: Family) -> transformers.PreTrainedTokenizerBase:
    """The tiny BPE tokenizer with the family's image tokens added as special tokens."""
    tokenizer = build_tokenizer()
    new = [token for token in FAMILY_TOKENS[family].values() if token not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens(
        {"additional_special_tokens": new}, replace_extra_special_tokens=False
    )
    return tokenizer


def family_spec(spec: TinyVLMSpec, family: Family) -> TinyVLMSpec:
    """``spec`` with the family's image size."""
    return dataclasses.replace(spec, image_size=IMAGE_SIZES[family])


def _token_id(tokenizer, family: Family, name: str) -> int:
    return tokenizer.convert_tokens_to_ids(FAMILY_TOKENS[family][name])


def _llama_config(spec: TinyVLMSpec, tokenizer) -> dict:
    fields = lm_config_fields(spec, tokenizer, tie_word_embeddings=False)
    return transformers.LlamaConfig(**fields).to_dict()


def _gemma3_text_config(spec: TinyVLMSpec, tokenizer) -> dict:
    # Alternate sliding and full layers, and a window shorter than an image block, so both
    # masks and their bidirectional image overlay matter.
    layer_types = ["sliding_attention", "full_attention"] * spec.num_layers
    fields = lm_config_fields(
        spec,
        tokenizer,
        tie_word_embeddings=False,
        head_dim=spec.head_dim,
        query_pre_attn_scalar=spec.head_dim,
        sliding_window=8,
        layer_types=layer_types[: spec.num_layers],
    )
    return transformers.Gemma3TextConfig(**fields).to_dict()


def _family_config(family: Family, spec: TinyVLMSpec, tokenizer) -> transformers.PretrainedConfig:
    vision = siglip_vision_config(spec).to_dict()
    image_id = _token_id(tokenizer, family, "image")
    common = {"tie_word_embeddings": False}
    if family == "llava_onevision":
        return transformers.LlavaOnevisionConfig(
            vision_config=vision,
            text_config=qwen2_config(spec, tokenizer).to_dict(),
            image_token_index=image_id,
            video_token_index=_token_id(tokenizer, family, "video"),
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_grid_pinpoints=ONEVISION_GRID,
            # At most one crop's worth of tokens: images on a 2x2 grid are downsampled.
            vision_aspect_ratio="anyres_max_1",
            **common,
        )
    if family == "internvl":
        side = [spec.image_size, spec.image_size]
        return transformers.InternVLConfig(
            vision_config=transformers.InternVLVisionConfig(
                **vision_config_fields(
                    spec, image_size=side, patch_size=[spec.patch_size, spec.patch_size]
                )
            ).to_dict(),
            text_config=qwen2_config(spec, tokenizer).to_dict(),
            image_token_id=image_id,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            **common,
        )
    if family == "gemma3":
        return transformers.Gemma3Config(
            vision_config=vision,
            text_config=_gemma3_text_config(spec, tokenizer),
            mm_tokens_per_image=16,
            boi_token_index=_token_id(tokenizer, family, "start"),
            eoi_token_index=_token_id(tokenizer, family, "end"),
            image_token_index=image_id,
            **common,
        )
    if family == "smolvlm":
        return transformers.SmolVLMConfig(
            vision_config=transformers.SmolVLMVisionConfig(**vision_config_fields(spec)).to_dict(),
            text_config=_llama_config(spec, tokenizer),
            image_token_id=image_id,
            scale_factor=2,
            **common,
        )
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_family_model(family: Family, spec: TinyVLMSpec, tokenizer) -> torch.nn.Module:
    """A randomly initialised fp32 model of ``family`` from ``spec`` (its image size is the
    family's, see ``IMAGE_SIZES``)."""
    reason = family_skip_reason(family)
    if reason:
        raise RuntimeError(reason)
    spec = family_spec(spec, family)
    config = _family_config(family, spec, tokenizer)
    with _seeded(spec.seed):
        model = family_host_class(family)._from_config(
            config, attn_implementation=spec.attn_implementation
        )
        # Parameters the host initialises to zeros that would make a stage trivial here: Gemma
        # 3's image projection (zero image embeddings, zero vision gradients), InternViT's
        # position embeddings (patch order invisible). Pretrained ones are not zero.
        for name in ZERO_INITIALISED.get(family, ()):
            torch.nn.init.normal_(model.get_parameter(name), std=spec.vision_hidden_size**-0.5)
    return model.float()


# ----------------------------------------------------------------------------------- batches


def _image_inputs(
    family: Family, images_per_sample: list[int], size: int, generator: torch.Generator
) -> dict:
    """The family's image inputs, of different shapes (OneVision: image sizes picking
    different anyres grids, multi-image samples as nested lists; InternVL: 1 or 2 crops per
    sample; SmolVLM: 1 or 2 crops, padded to 2 with an all-zero image, and a pixel mask with a
    padded strip)."""
    n = len(images_per_sample)

    def pixels(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, 3, size, size, generator=generator)

    if family == "llava_onevision":
        from PIL import Image

        sizes = [(40, 70), (64, 64), (70, 36), (30, 30)]
        images = [
            [
                Image.fromarray(
                    torch.randint(
                        0, 256, (*sizes[(i + j) % 4], 3), generator=generator, dtype=torch.uint8
                    ).numpy()
                )
                for j in range(count)
            ]
            for i, count in enumerate(images_per_sample)
        ]
        processor = transformers.LlavaOnevisionImageProcessorPil(
            size={"height": size, "width": size}, image_grid_pinpoints=ONEVISION_GRID
        )
        return dict(processor(images, return_tensors="pt"))
    if family == "internvl":
        return {"pixel_values": pixels(sum(1 + i % 2 for i in range(n)))}
    if family == "gemma3":
        return {"pixel_values": pixels(n)}
    if family == "smolvlm":
        values = pixels(n, 2)
        mask = torch.ones(n, 2, size, size, dtype=torch.bool)
        for i in range(0, n, 2):  # one crop: the second image slot is padding
            values[i, 1] = 0
            mask[i, 1] = False
        values[:, :, :, :, -size // 4 :] = 0  # a padded strip on the right of every crop
        mask[:, :, :, -size // 4 :] = False
        return {"pixel_values": values, "pixel_attention_mask": mask}
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _features_per_sample(
    family: Family, model, image_inputs: dict, images_per_sample: list[int]
) -> list[list[int]]:
    """Per sample, the host's feature count of each image block (from its own
    ``get_image_features``), which the processor repeats the image token for."""
    n = len(images_per_sample)
    with torch.no_grad():
        if family == "llava_onevision":
            counts = iter(
                int(f.shape[0])
                for f in model.model.get_image_features(**image_inputs).pooler_output
            )
            return [[next(counts) for _ in range(count)] for count in images_per_sample]
        if family == "internvl":
            per_crop = model.model.get_image_features(image_inputs["pixel_values"]).pooler_output
            crops = [1 + i % 2 for i in range(n)]
            return [[per_crop.shape[1]] * count for count in crops]
        if family == "gemma3":
            return [[model.config.mm_tokens_per_image]] * n
        out = model.model.get_image_features(**image_inputs).pooler_output
        tokens = model.model.image_seq_len
        return [[tokens] * (int(f.shape[0]) // tokens) for f in out]


def _placeholder(family: Family, tokenizer, blocks: list[int]) -> list[int]:
    """The token ids standing for one sample's image, as the family's processor writes them."""
    image = _token_id(tokenizer, family, "image")
    if family == "llava_onevision":  # several images: adjacent runs, as "<image><image>"
        return [image] * sum(blocks)
    start, end = _token_id(tokenizer, family, "start"), _token_id(tokenizer, family, "end")
    if family in ("internvl", "gemma3"):  # <img> context x crops*tokens </img>
        return [start] + [image] * sum(blocks) + [end]
    # SmolVLM: each crop after <fake_token_around_image>, the last (global) one after
    # <fake_token_around_image><global-img>, closed by <fake_token_around_image>.
    ids: list[int] = []
    for index, tokens in enumerate(blocks):
        ids += [start] + ([end] if index == len(blocks) - 1 else []) + [image] * tokens
    return [*ids, start]


def make_family_batch(
    family: Family,
    model,
    tokenizer,
    n: int = 3,
    seed: int = 0,
    *,
    padding_side: Literal["right", "left"] = "right",
    images_per_sample: Sequence[int] | None = None,
    text_only: bool = False,
) -> dict[str, torch.Tensor]:
    """A collated batch of ``n`` samples, one image each, of different lengths, for ``model``.

    ``images_per_sample`` (LLaVA-OneVision only): several images in a sample (not split into
    crops by the host, their image tokens adjacent). ``text_only``: no image at all (no image
    tokens, no image inputs), as a text-only conversation of a LLaVA mixture.

    Keys: ``input_ids``, ``attention_mask`` (long), ``labels`` [n, T] (-100 off the answer),
    the family's image inputs (``pixel_values`` and ``image_sizes`` + ``batch_num_images``
    (OneVision) or ``pixel_attention_mask`` (SmolVLM)), and Gemma 3's ``token_type_ids``
    (1 on image tokens).
    """
    if images_per_sample is None:
        images_per_sample = [1] * n
    elif family != "llava_onevision" or len(images_per_sample) != n:
        raise ValueError(
            f"images_per_sample={images_per_sample!r}: only for llava_onevision, one count per "
            f"sample ({n})"
        )
    images_per_sample = list(images_per_sample)
    generator = torch.Generator().manual_seed(seed)
    conversations = make_conversations(n, seed)
    if text_only:
        image_inputs, placeholders = {}, [[]] * n
    else:
        image_inputs = _image_inputs(family, images_per_sample, IMAGE_SIZES[family], generator)
        blocks = _features_per_sample(family, model, image_inputs, images_per_sample)
        placeholders = [_placeholder(family, tokenizer, sample_blocks) for sample_blocks in blocks]
    samples = [
        _encode_sample(tokenizer, question, answer, placeholder)
        for (question, answer), placeholder in zip(conversations, placeholders, strict=True)
    ]
    ids = _pad([sample_ids for sample_ids, _ in samples], tokenizer.pad_token_id, padding_side)
    batch = {
        "input_ids": ids,
        "attention_mask": _pad([[1] * len(s) for s, _ in samples], 0, padding_side),
        "labels": _pad([labels for _, labels in samples], IGNORE_INDEX, padding_side),
        **image_inputs,
    }
    if family == "gemma3":
        batch["token_type_ids"] = (ids == _token_id(tokenizer, family, "image")).long()
    return batch
