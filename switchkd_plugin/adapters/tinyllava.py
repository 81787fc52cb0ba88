"""Adapter for TinyLLaVA Factory's ``TinyLlavaForConditionalGeneration``.

Mirrors ``encode_images`` (vision tower with the config's feature layer and select strategy, then
the connector) and ``prepare_inputs_labels_for_multimodal`` (one -200 token per image, the
config's padding side and ``tokenizer_model_max_length``). The Factory is not imported here: the
model is recognised by class name.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters.base import SpliceRules, VLMAdapter

IMAGE_TOKEN_INDEX = -200  # tinyllava.utils.constants.IMAGE_TOKEN_INDEX
# The component directories the Factory's LoRA recipe saves base weights into.
_COMPONENTS = ("language_model", "vision_tower", "connector")


class TinyLlavaAdapter(VLMAdapter):
    """TinyLLaVA: ``model.vision_tower`` -> ``model.connector`` -> ``model.language_model``."""

    images_key: ClassVar[str] = "images"
    host_class_name: ClassVar[str] = (
        "tinyllava.model.modeling_tinyllava.TinyLlavaForConditionalGeneration"
    )

    @classmethod
    def supports_class(cls, model_class: type) -> bool:
        return any(
            f"{klass.__module__}.{klass.__qualname__}" == cls.host_class_name
            for klass in model_class.__mro__
        )

    @classmethod
    def load_lora_base(cls, directory: Path, model_class: type, config) -> nn.Module | None:
        """What the Factory's LoRA recipe saved beside its adapters, loaded as its
        ``load_pretrained_model`` does: the model built from the directory's config, then each
        component's base weights (``<component>/pytorch_model.bin``, LoRA-wrapped names without
        ``.base_layer``). None for a directory without them."""
        files = {name: directory / name / "pytorch_model.bin" for name in _COMPONENTS}
        if config is None or not all(path.is_file() for path in files.values()):
            return None
        model = model_class(config)
        for name, path in files.items():
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only
            state = {key.replace(".base_layer", ""): value for key, value in state.items()}
            module = model.vision_tower._vision_tower if name == "vision_tower" else (
                getattr(model, name)
            )  # fmt: skip
            # The Factory's loader loads the connector non-strictly (a frozen connector saves
            # nothing when tuned parameters only are kept); the others must match exactly.
            module.load_state_dict(state, strict=name != "connector")
        return model

    @property
    def vision_module(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def connector(self) -> nn.Module:
        return self.model.connector

    @property
    def decoder(self) -> nn.Module:
        return self.model.language_model.get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.language_model.get_output_embeddings()

    @property
    def vision_output_width(self) -> int:
        return self.model.vision_tower._vision_tower.config.hidden_size

    def generate_new_tokens(self, prompts: dict, **generate_kwargs) -> Tensor:
        """TinyLLaVA's `generate(inputs, images)` starts from embeddings, returns the new tokens
        only, and re-pads the prompts on the side its `config.tokenizer_padding_side` names:
        left, for the length of the call."""
        config = self.model.config
        saved = config.to_dict().get("tokenizer_padding_side")  # None: unset (then unset again)
        config.tokenizer_padding_side = "left"
        try:
            ids = prompts["input_ids"]
            rest = {key: value for key, value in prompts.items() if key != "input_ids"}
            return self.model.generate(inputs=ids, **rest, **generate_kwargs)
        finally:
            if saved is None:
                del config.tokenizer_padding_side
            else:
                config.tokenizer_padding_side = saved

    @property
    def connector_input_width(self) -> int:
        return self.model.config.vision_hidden_size

    @property
    def connector_output_width(self) -> int:
        return self.model.config.hidden_size

    def encode_vision(self, images: Tensor) -> Tensor:
        """[B, 3, h, w] -> [B, P, Dv], as ``TinyLlavaForConditionalGeneration.encode_images``
        before its connector call."""
        config = self.model.config
        images = images.to(device=self.model.device, dtype=self.model.dtype)
        return self.model.vision_tower(
            images,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )

    @property
    def image_token_id(self) -> int:
        return IMAGE_TOKEN_INDEX

    def select_samples(self, batch: dict, keep: Tensor, images: Tensor) -> tuple[dict, Tensor]:
        """The Factory gives every sample an image, a zero one (appended with zero length, so
        never seen) to a text-only sample without -200 token: ``images`` [B, ...] (features or
        embeddings) and ``batch["images"]`` are cut to the kept samples too."""
        sub, _ = super().select_samples(batch, keep, images)
        sub[self.images_key] = batch[self.images_key][keep]
        return sub, images[keep]

    def splice_rules(self, attention_mask: Tensor) -> SpliceRules:
        config = self.model.config
        return SpliceRules(
            placeholder_id=IMAGE_TOKEN_INDEX,
            merge_runs=False,
            text_only_consumes_image=True,
            padding_side=getattr(config, "tokenizer_padding_side", "right"),
            max_length=getattr(config, "tokenizer_model_max_length", None),
        )
