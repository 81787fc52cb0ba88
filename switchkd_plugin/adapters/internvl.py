"""Adapter for transformers' ``InternVLForConditionalGeneration`` (InternVL3).

The host's image path: InternViT on every crop (``pixel_values`` [crops, 3, s, s], the
processor's tiles of all images, flat), hidden states of ``vision_feature_layer`` (the last
layer's output for -1), the CLS token dropped for the ``default`` strategy, then
``pixel_shuffle`` by ``downsample_ratio`` (2x2 neighbouring tokens folded into one, 4x wider) and
``multi_modal_projector`` (LayerNorm + 2-layer MLP).

Where the switch sits: after the vision tower, before the pixel shuffle. The shuffle is a fixed
rearrangement but makes the connector's input width 4x the encoder's, so it belongs to the
connector (the issue's "pixel shuffle + MLP"): ``project`` = shuffle + projector.
"""

from __future__ import annotations

from torch import Tensor

from switchkd_plugin.adapters.base import placement
from switchkd_plugin.adapters.hf_family import ScatteredImageTokensAdapter


class InternVLAdapter(ScatteredImageTokensAdapter):
    """InternVL: InternViT -> pixel shuffle + MLP projector -> LM."""

    host_class_name = "transformers.InternVLForConditionalGeneration"

    @property
    def _shuffle_factor(self) -> int:
        return round(1 / self.model.config.downsample_ratio) ** 2

    @property
    def vision_output_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def connector_input_width(self) -> int:
        """The encoder width the shuffle + projector take (the projector sees it x4)."""
        return self.connector.linear_1.in_features // self._shuffle_factor

    @property
    def connector_output_width(self) -> int:
        return self.connector.linear_2.out_features

    switch_config_fields = (
        *ScatteredImageTokensAdapter.switch_config_fields,
        "downsample_ratio",
        "vision_feature_select_strategy",
    )
    vision_switch_config_fields = (
        "vision_config.hidden_size",
        "vision_config.num_hidden_layers",
        "vision_config.intermediate_size",
        "vision_config.norm_type",
        "vision_feature_layer",
    )

    def encode_vision(self, images: Tensor) -> Tensor:
        """Crops [N, 3, s, s] -> [N, P, Dv] (P = patches, the CLS token dropped for the
        ``default`` strategy)."""
        config = self.model.config
        layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
        if not isinstance(layer, int):
            raise ValueError(f"InternVL takes one vision_feature_layer, got {layer!r}")
        outputs = self.vision_module(
            pixel_values=self._vision_input(images),
            output_hidden_states=layer != -1,
            return_dict=True,
        )
        features = outputs.last_hidden_state if layer == -1 else outputs.hidden_states[layer]
        return features[:, 1:] if strategy == "default" else features

    def project(self, features: Tensor) -> Tensor:
        """[N, P, Dv] -> pixel shuffle [N, P / 4, 4 Dv] -> projector [N, P / 4, H]."""
        features = features.to(**placement(self.connector))
        crops, tokens, _ = features.shape
        side = int(tokens**0.5)
        grid = features.reshape(crops, side, side, -1)
        shuffled = self.parts.pixel_shuffle(grid, scale_factor=self.model.config.downsample_ratio)
        return self.connector(shuffled.reshape(crops, -1, shuffled.shape[-1]))
