"""Adapter for TinyLLaVA Factory's ``TinyLlavaForConditionalGeneration``.

Mirrors ``encode_images`` (vision tower with the config's feature layer and select strategy, then
the connector) and ``prepare_inputs_labels_for_multimodal`` (one -200 token per image, the
config's padding side and ``tokenizer_model_max_length``). The Factory is not imported here: the
model is recognised by class name.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from switchkd_plugin.adapters.base import SpliceRules, VLMAdapter

IMAGE_TOKEN_INDEX = -200  # tinyllava.utils.constants.IMAGE_TOKEN_INDEX


class TinyLlavaAdapter(VLMAdapter):
    """TinyLLaVA: ``model.vision_tower`` -> ``model.connector`` -> ``model.language_model``."""

    images_key: ClassVar[str] = "images"
    host_class_name: ClassVar[str] = (
        "tinyllava.model.modeling_tinyllava.TinyLlavaForConditionalGeneration"
    )

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        return any(
            f"{klass.__module__}.{klass.__qualname__}" == cls.host_class_name
            for klass in type(model).__mro__
        )

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

    def splice_rules(self, attention_mask: Tensor) -> SpliceRules:
        config = self.model.config
        return SpliceRules(
            placeholder_id=IMAGE_TOKEN_INDEX,
            merge_runs=False,
            text_only_consumes_image=True,
            padding_side=getattr(config, "tokenizer_padding_side", "right"),
            max_length=getattr(config, "tokenizer_model_max_length", None),
        )
