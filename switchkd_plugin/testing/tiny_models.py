"""Tiny, offline, deterministic VLMs, tokenizer and training batches for tests, benchmarks, demos.

Everything is built from configs with random weights (seeded); nothing is downloaded. The
tokenizer is a byte-level BPE trained here on a small built-in English corpus and wrapped as a
Qwen2 tokenizer, so the same files serve transformers 4.40 (slow and fast) and 5.x.

Two hosts are covered:

- ``"hf_llava"``: ``transformers.LlavaForConditionalGeneration`` (Qwen2 text model + SigLIP vision
  model + the 2-layer GELU projector);
- ``"tinyllava"``: TinyLLaVA Factory's ``TinyLlavaForConditionalGeneration``, built through the
  Factory's own train path (component directories on disk, ``TinyLlavaConfig.load_from_config``,
  ``load_llm`` / ``load_vision_tower`` / ``load_connector``).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from switchkd_plugin.constants import IGNORE_INDEX
from switchkd_plugin.testing.corpus import (
    COLOURS,
    FACTS,
    NUMBERS,
    QUESTIONS,
    SHAPES,
    SIDES,
    SYSTEM_PROMPT,
    sentences,
)

# Qwen2's pre-tokenizer split (the same regex its slow tokenizer uses), so slow == fast.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

if TYPE_CHECKING:
    from torch import nn

Host = Literal["tinyllava", "hf_llava"]

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN, IMAGE_TOKEN)
# TinyLLaVA Factory's constants (tinyllava/utils/constants.py), repeated so this module imports
# without the Factory.
FACTORY_IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of one tiny VLM: Qwen2 LM, SigLIP vision encoder, MLP connector."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int = 64
    image_size: int = 32
    patch_size: int = 8
    vision_feature_layer: int = -2
    connector_type: str = "mlp2x_gelu"
    max_length: int = 512  # max positions; also the Factory's tokenizer_model_max_length
    vocab_multiple_of: int = 1  # pad the LM vocabulary (real Qwen checkpoints pad to 64/128)
    attn_implementation: str = "eager"
    tie_word_embeddings: bool = False  # the LM's lm_head is its input embedding (Qwen2.5-0.5B)
    seed: int = 0

    @property
    def head_dim(self) -> int:
        """Width of one attention head of the LM."""
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        """Patch tokens the vision encoder emits per image (SigLIP has no CLS token)."""
        return (self.image_size // self.patch_size) ** 2

    def lm_vocab_size(self, tokenizer: transformers.PreTrainedTokenizerBase) -> int:
        """``len(tokenizer)`` rounded up to ``vocab_multiple_of``."""
        multiple = self.vocab_multiple_of
        return -(-len(tokenizer) // multiple) * multiple


def teacher_spec(**overrides: object) -> TinyVLMSpec:
    """Teacher preset: LM wider and deeper than the student's, same vision width."""
    spec = TinyVLMSpec(
        name="teacher",
        hidden_size=96,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
        vision_layers=3,
        seed=1,
    )
    return dataclasses.replace(spec, **overrides)


def student_spec(**overrides: object) -> TinyVLMSpec:
    """Student preset: a smaller LM, vision output width equal to the teacher's."""
    spec = TinyVLMSpec(
        name="student",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        seed=2,
    )
    return dataclasses.replace(spec, **overrides)


# --------------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int = 600) -> transformers.PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus and wrap it as a Qwen2 tokenizer.

    Special tokens: ``<|endoftext|>`` (pad, unk), ``<|im_start|>``, ``<|im_end|>`` (eos) and
    ``<image>``. ``save_pretrained`` writes vocab.json + merges.txt on transformers 4.x, so the
    directory also loads with ``use_fast=False`` (as TinyLLaVA Factory loads it).
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sentences(), trainer=trainer)
    return transformers.Qwen2TokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN, EOS_TOKEN, IMAGE_TOKEN],
    )


# ------------------------------------------------------------------------------------ models


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def lm_config_fields(
    spec: TinyVLMSpec, tokenizer: transformers.PreTrainedTokenizerBase, **overrides: object
) -> dict:
    """The spec's language model sizes and token ids as config keyword arguments (the names the
    Qwen2, Llama, Gemma 3 and Qwen-VL text configs share); `overrides` add or replace fields.

    No pad or bos id, as in real Qwen2 configs: a zero pad embedding makes transformers 4.40's
    LLaVA merge mistake pad slots for image slots.
    """
    fields = dict(
        vocab_size=spec.lm_vocab_size(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_length,
        tie_word_embeddings=spec.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        bos_token_id=None,
    )
    fields.update(overrides)
    return fields


def qwen2_config(
    spec: TinyVLMSpec, tokenizer: transformers.PreTrainedTokenizerBase
) -> transformers.Qwen2Config:
    """The spec's language model config (embeddings tied as the spec says, no sliding window, no
    pad id)."""
    return transformers.Qwen2Config(**lm_config_fields(spec, tokenizer, use_sliding_window=False))


def vision_config_fields(spec: TinyVLMSpec, **overrides: object) -> dict:
    """The spec's vision encoder sizes as config keyword arguments (the names the SigLIP, SmolVLM
    and InternVL vision configs share); `overrides` add or replace fields."""
    fields = dict(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=spec.vision_intermediate_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
    )
    fields.update(overrides)
    return fields


def siglip_vision_config(spec: TinyVLMSpec) -> transformers.SiglipVisionConfig:
    """The spec's vision encoder config."""
    return transformers.SiglipVisionConfig(**vision_config_fields(spec))


def build_hf_llava(
    spec: TinyVLMSpec,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    select_strategy: Literal["full", "default"] = "full",
) -> transformers.LlavaForConditionalGeneration:
    """A randomly initialised fp32 ``LlavaForConditionalGeneration`` from ``spec``.

    ``select_strategy="full"`` keeps every SigLIP patch (SigLIP has no CLS token);
    ``"default"`` drops the first patch as LLaVA does for CLIP's CLS token.
    """
    if spec.connector_type != "mlp2x_gelu":
        raise ValueError(f"HF LLaVA's projector is mlp2x_gelu, got {spec.connector_type!r}")
    config = transformers.LlavaConfig(
        vision_config=siglip_vision_config(spec).to_dict(),
        text_config=qwen2_config(spec, tokenizer).to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy=select_strategy,
        vision_feature_layer=spec.vision_feature_layer,
        # Image tokens per image; transformers 4.45-4.47 pick the legacy single-token merge
        # whenever a sample has fewer image tokens than this.
        image_seq_length=spec.num_patches - int(select_strategy == "default"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with _seeded(spec.seed):
        model = transformers.LlavaForConditionalGeneration._from_config(
            config, attn_implementation=spec.attn_implementation
        )
    return model.float()


# A Qwen-style chat template with LLaVA's image placeholder: what the LLaVA processor renders.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llava_processor(
    spec: TinyVLMSpec, tokenizer: transformers.PreTrainedTokenizerBase
) -> transformers.LlavaProcessor:
    """The processor of a ``build_hf_llava(spec, tokenizer, select_strategy="full")`` model:
    SigLIP's image processor at ``spec.image_size``, one ``<image>`` token per patch, the chat
    template ``LLAVA_CHAT_TEMPLATE`` (also set on ``tokenizer``)."""
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    size = {"height": spec.image_size, "width": spec.image_size}
    return transformers.LlavaProcessor(
        image_processor=transformers.SiglipImageProcessor(size=size),
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )


def write_tinyllava_components(
    spec: TinyVLMSpec, tokenizer: transformers.PreTrainedTokenizerBase, workdir: str | os.PathLike
) -> tuple[Path, Path]:
    """Write the LLM dir (weights, config, tokenizer) and the vision dir (weights, config,
    preprocessor config) that TinyLLaVA Factory's ``--model_name_or_path`` / ``--vision_tower``
    expect. The Factory dispatches on substrings of these paths: ``qwen2`` and ``siglip``.
    """
    root = Path(workdir) / spec.name
    llm_dir, vision_dir = root / "qwen2-lm", root / "siglip-vision"
    with _seeded(spec.seed):
        llm = transformers.Qwen2ForCausalLM(qwen2_config(spec, tokenizer))
        vision = transformers.SiglipVisionModel(siglip_vision_config(spec))
    llm.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    vision.save_pretrained(vision_dir)
    image_size = {"height": spec.image_size, "width": spec.image_size}
    transformers.SiglipImageProcessor(size=image_size).save_pretrained(vision_dir)
    return llm_dir, vision_dir


def _check_dispatch(path: Path, registry: dict[str, object], expected: str) -> None:
    """The Factory picks the LAST registered name found in the path: make sure it is ours."""
    found = [name for name in registry if name.lower() in str(path).lower()]
    if found != [expected]:
        raise ValueError(
            f"TinyLLaVA Factory would dispatch {str(path)!r} on {found}, not [{expected!r}]: "
            "choose a workdir whose path names no other registered component"
        )


def build_tinyllava(
    spec: TinyVLMSpec,
    tokenizer: transformers.PreTrainedTokenizerBase,
    workdir: str | os.PathLike,
    *,
    padding_side: Literal["right", "left"] = "right",
    select_feature: Literal["patch", "cls_patch"] = "patch",
) -> nn.Module:
    """A randomly initialised fp32 ``TinyLlavaForConditionalGeneration``, built as the Factory's
    ``train()`` builds one (without a pretrained checkpoint), all parameters trainable.

    ``padding_side``: the Factory's ``--tokenizer_padding_side``, the side on which the model
    re-pads its rows after splicing the image features in (and its tokenizer's padding side).
    ``select_feature``: the Factory's ``--mm_vision_select_feature``; ``"patch"`` drops the first
    vision token as if it were a CLS token (SigLIP has none: one patch is dropped), ``"cls_patch"``
    keeps every token.
    Needs TinyLLaVA Factory importable (see ``switchkd_plugin.integrations.tinyllava.compat``).
    """
    from switchkd_plugin.integrations.tinyllava.compat import import_tinyllava

    import_tinyllava()
    from tinyllava.model import (
        LLM_FACTORY,
        VISION_TOWER_FACTORY,
        TinyLlavaConfig,
        TinyLlavaForConditionalGeneration,
    )

    llm_dir, vision_dir = write_tinyllava_components(spec, tokenizer, workdir)
    _check_dispatch(llm_dir, LLM_FACTORY, "qwen2")
    _check_dispatch(vision_dir, VISION_TOWER_FACTORY, "siglip")
    # The attributes TinyLlavaConfig.load_from_config reads from the Factory's ModelArguments.
    model_arguments = SimpleNamespace(
        model_name_or_path=str(llm_dir),
        tokenizer_name_or_path=None,
        vision_tower=str(vision_dir),
        vision_tower2="",
        connector_type=spec.connector_type,
        mm_vision_select_layer=spec.vision_feature_layer,
        mm_vision_select_feature=select_feature,
        image_aspect_ratio="square",
        model_max_length=spec.max_length,
        tokenizer_use_fast=False,
        tokenizer_padding_side=padding_side,
    )
    config = TinyLlavaConfig()
    config.load_from_config(model_arguments)
    with _seeded(spec.seed):  # the connector is initialised here
        model = TinyLlavaForConditionalGeneration(config)
    model.load_llm(
        model_name_or_path=str(llm_dir),
        cache_dir=None,
        attn_implementation=spec.attn_implementation,
        torch_dtype=torch.float32,
    )
    model.load_vision_tower(model_name_or_path=str(vision_dir))
    model.load_connector(connector_type=spec.connector_type)
    # The load_* calls freeze everything; a full-tune recipe unfreezes, as here.
    model.requires_grad_(True)
    model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------------- batches


def make_conversations(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs; answer ``i`` has ``i + 1`` sentences, so lengths differ."""
    rng = random.Random(seed)
    conversations = []
    for i in range(n):
        question = rng.choice(QUESTIONS).format(
            colour=rng.choice(COLOURS), shape=rng.choice(SHAPES)
        )
        facts = [
            rng.choice(FACTS).format(
                colour=rng.choice(COLOURS),
                shape=rng.choice(SHAPES),
                side=rng.choice(SIDES),
                number=rng.choice(NUMBERS),
            )
            for _ in range(i + 1)
        ]
        conversations.append((question, " ".join(facts)))
    return conversations


def _encode_sample(
    tokenizer: transformers.PreTrainedTokenizerBase,
    question: str,
    answer: str,
    placeholder: list[int],
) -> tuple[list[int], list[int]]:
    """Token ids and labels of one sample in the Factory's qwen2_instruct format:
    ``{system} USER: <image>\\n{question} ASSISTANT: {answer}<|im_end|>``; the answer and its
    eos are supervised. The prompt is split at "ASSISTANT:", a pre-token boundary, so the ids
    equal those of the whole string.
    """
    before_image, after_image = f"{SYSTEM_PROMPT} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:".split(
        IMAGE_TOKEN
    )
    prompt = tokenizer(before_image).input_ids + placeholder + tokenizer(after_image).input_ids
    response = tokenizer(f" {answer}{EOS_TOKEN}").input_ids
    return prompt + response, [IGNORE_INDEX] * len(prompt) + response


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    """[n][len_i] -> [n, max_len] padded on ``side``."""
    width = max(len(row) for row in rows)
    padded = [
        [value] * (width - len(row)) + row if side == "left" else row + [value] * (width - len(row))
        for row in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


def make_batch(
    tokenizer: transformers.PreTrainedTokenizerBase,
    host: Host,
    n: int = 2,
    seed: int = 0,
    *,
    image_size: int = 32,
    image_tokens_per_image: int = 1,
    padding_side: Literal["right", "left"] = "right",
    text_only_rows: tuple[int, ...] = (),
) -> dict[str, torch.Tensor]:
    """A collated training batch of ``n`` samples, one image each (none for
    ``text_only_rows``), of different lengths.

    - ``tinyllava``: one ``IMAGE_TOKEN_INDEX`` (-200) per sample, as the Factory's data pipeline
      makes; bool attention mask; images under ``images``. ``image_tokens_per_image`` must be 1.
    - ``hf_llava``: the ``<image>`` token id, ``image_tokens_per_image`` times per image (1 for
      the older single-token convention; the feature count for processors that pre-expand);
      long attention mask; images under ``pixel_values``.

    Keys: ``input_ids`` [n, T], ``attention_mask`` [n, T], ``labels`` [n, T] (-100 on the prompt,
    the image tokens and padding), and the image key: TinyLLaVA [n, 3, image_size, image_size]
    (a text-only sample gets a zero image and no -200 token, as the Factory's dataset gives
    it); HF LLaVA one image per image sample, the key left out when there is none.
    """
    if host == "tinyllava":
        if image_tokens_per_image != 1:
            raise ValueError("TinyLLaVA marks each image with a single -200 token")
        placeholder = [FACTORY_IMAGE_TOKEN_INDEX]
        images_key, mask_dtype = "images", torch.bool
    elif host == "hf_llava":
        placeholder = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * image_tokens_per_image
        images_key, mask_dtype = "pixel_values", torch.long
    else:
        raise ValueError(f"unknown host {host!r}; expected 'tinyllava' or 'hf_llava'")

    samples = [
        _encode_sample(tokenizer, question, answer, [] if i in text_only_rows else placeholder)
        for i, (question, answer) in enumerate(make_conversations(n, seed))
    ]
    ids = [sample_ids for sample_ids, _ in samples]
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, image_size, image_size, generator=generator)
    text_only = torch.tensor([i in text_only_rows for i in range(n)])
    batch = {
        "input_ids": _pad(ids, tokenizer.pad_token_id, padding_side),
        "attention_mask": _pad([[1] * len(row) for row in ids], 0, padding_side).to(mask_dtype),
        "labels": _pad([labels for _, labels in samples], IGNORE_INDEX, padding_side),
    }
    if host == "tinyllava":
        batch[images_key] = images.masked_fill(text_only[:, None, None, None], 0.0)
    elif not text_only.all():
        batch[images_key] = images[~text_only]
    return batch


def hf_image_token_conventions(model: nn.Module) -> set[str]:
    """Image-token conventions the installed transformers' LLaVA forward accepts."""
    if not hasattr(model, "_merge_input_ids_with_image_features"):
        return {"expanded"}  # >= 4.48: placeholders must already match the feature count
    if "legacy_processing" in inspect.getsource(type(model).forward):
        return {"single", "expanded"}  # 4.45-4.47 accept both
    return {"single"}  # <= 4.44: each image token is expanded by the model


def make_host_batch(
    model: nn.Module,
    tokenizer: transformers.PreTrainedTokenizerBase,
    n: int = 2,
    seed: int = 0,
    text_only_rows: tuple[int, ...] = (),
) -> dict[str, torch.Tensor]:
    """`make_batch` for `model`'s host, in an image-token convention its forward accepts."""
    from switchkd_plugin.adapters import HFLlavaAdapter, adapter_for

    adapter = adapter_for(model)
    if not isinstance(adapter, HFLlavaAdapter):
        return make_batch(tokenizer, "tinyllava", n=n, seed=seed, text_only_rows=text_only_rows)
    size, tokens = model.config.vision_config.image_size, 1
    if "expanded" in hf_image_token_conventions(model):
        tokens = adapter.encode_vision(torch.zeros(1, 3, size, size)).shape[1]
    return make_batch(
        tokenizer,
        "hf_llava",
        n=n,
        seed=seed,
        image_size=size,
        image_tokens_per_image=tokens,
        text_only_rows=text_only_rows,
    )
