"""Adapter for transformers' ``LlavaForConditionalGeneration``.

Two layouts exist: up to transformers 4.51 the vision tower, projector and a CausalLM
``language_model`` hang off the model itself; from 4.52 (and in 5.x) they hang off ``model.model``
with the base LM as ``language_model`` and the head as ``model.lm_head``. Images are marked with
``config.image_token_index`` (``image_token_id`` in newer configs): one token per image in the
older convention, or pre-expanded to the feature count by newer processors. Each maximal run of
image tokens is one image, which covers both.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters.hf_family import TransformersVLMAdapter


class LlavaVisionFeatures:
    """The LLaVA feature selection (hidden states of ``vision_feature_layer``, the first token
    dropped for the ``default`` strategy) and the widths of its ``linear_1`` / ``linear_2``
    projector, shared by HF LLaVA and LLaVA-OneVision (on a ``TransformersVLMAdapter``)."""

    @property
    def _feature_layers(self) -> list[int]:
        layer = self.model.config.vision_feature_layer
        return [layer] if isinstance(layer, int) else list(layer)

    @property
    def vision_output_width(self) -> int:
        return self.model.config.vision_config.hidden_size * len(self._feature_layers)

    @property
    def connector_input_width(self) -> int:
        return self.connector.linear_1.in_features

    @property
    def connector_output_width(self) -> int:
        return self.connector.linear_2.out_features

    def encode_vision(self, images: Tensor) -> Tensor:
        """Images (or crops) [N, 3, s, s] -> [N, P, Dv], as the host's forward selects features:
        hidden states of ``vision_feature_layer`` (several layers are concatenated), the first
        token dropped for the ``default`` strategy and kept for ``full``."""
        strategy = self.model.config.vision_feature_select_strategy
        if strategy not in ("default", "full"):
            raise ValueError(f"unexpected vision_feature_select_strategy {strategy!r}")
        hidden_states = self.vision_module(
            self._vision_input(images), output_hidden_states=True, return_dict=True
        ).hidden_states
        selected = [hidden_states[layer] for layer in self._feature_layers]
        if strategy == "default":
            selected = [states[:, 1:] for states in selected]
        return torch.cat(selected, dim=-1)


class HFLlavaAdapter(LlavaVisionFeatures, TransformersVLMAdapter):
    """HF LLaVA: vision tower -> ``multi_modal_projector`` -> language model.

    ``pathway_inputs`` is ``VLMAdapter``'s: each run of image tokens takes one image's
    features, whatever the run's length (one token per image, or pre-expanded)."""

    host_class_name: ClassVar[str] = "transformers.LlavaForConditionalGeneration"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # >= 4.52: components live on the inner LlavaModel; before: on the model itself.
        inner = getattr(model, "model", None)
        self._parts = inner if hasattr(inner, "multi_modal_projector") else model

    @property
    def parts(self) -> nn.Module:
        return self._parts

    @property
    def decoder(self) -> nn.Module:
        language_model = super().decoder
        # Old layout: a CausalLM whose base model is the decoder; new layout: the base model.
        return language_model.get_decoder() if self._parts is self.model else language_model

    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token_id = getattr(config, "image_token_index", None)
        return token_id if token_id is not None else config.image_token_id
