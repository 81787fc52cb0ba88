"""Adapter for transformers' ``SmolVLMForConditionalGeneration``.

The host's image path: ``pixel_values`` [B, max_images, 3, s, s] (each sample's image split
into crops plus a global view; slots past a sample's count are all-zero padding images and are
dropped), ``pixel_attention_mask`` [B, max_images, s, s] turned into a patch mask for the
SigLIP-style vision transformer, its last hidden state (post-layernorm) -> the ``connector``
(pixel shuffle by ``scale_factor``, then a linear projection).

Where the switch sits: after the vision transformer, before the connector (pixel shuffle +
projection is the teacher's).
"""

from __future__ import annotations

import torch
from torch import Tensor

from switchkd_plugin.adapters.hf_family import ScatteredImageTokensAdapter


class SmolVLMAdapter(ScatteredImageTokensAdapter):
    """SmolVLM: vision transformer -> pixel shuffle + projection -> LM."""

    host_class_name = "transformers.SmolVLMForConditionalGeneration"
    part_names = ("vision_model", "connector", "text_model")

    @property
    def vision_output_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def connector_input_width(self) -> int:
        projection = self.connector.modality_projection.proj
        return projection.in_features // self.model.config.scale_factor**2

    @property
    def connector_output_width(self) -> int:
        return self.connector.modality_projection.proj.out_features

    switch_config_fields = (*ScatteredImageTokensAdapter.switch_config_fields, "scale_factor")
    vision_switch_config_fields = (
        "vision_config.hidden_size",
        "vision_config.num_hidden_layers",
        "vision_config.intermediate_size",
    )

    def placeholder_images(self) -> dict[str, Tensor]:
        """One blank image in one slot, [1, 1, 3, S, S], every pixel valid (an all-zero image
        is padding to the host, but the only one is kept)."""
        height, width = self._image_size
        pixel_values = self._blank(1, 1, 3, height, width)
        mask = torch.ones(1, 1, height, width, dtype=torch.bool, device=pixel_values.device)
        return {"pixel_values": pixel_values, "pixel_attention_mask": mask}

    def encode_vision(self, images: Tensor, patch_attention_mask: Tensor | None = None) -> Tensor:
        """Images [N, 3, s, s] (and their patch mask [N, s/p, s/p], None = all patches) ->
        the vision transformer's last hidden state [N, P, Dv]."""
        return self.vision_module(
            pixel_values=self._vision_input(images),
            patch_attention_mask=patch_attention_mask,
            return_dict=True,
        ).last_hidden_state

    def vision_features(self, batch: dict) -> Tensor | None:
        """The real images of the batch, in order, with the host's patch mask: [N, P, Dv]
        (None without images)."""
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            return None
        if pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: SmolVLM takes "
                "[batch, images, 3, height, width] (as its processor makes them)"
            )
        images = pixel_values.flatten(0, 1)
        # As the host: an all-zero image is padding, but keep one image if all are.
        real = (images == 0.0).sum(dim=(-1, -2, -3)) != images.shape[1:].numel()
        real[0] |= ~torch.any(real)
        images = images[real]
        pixel_mask = batch.get("pixel_attention_mask")
        if pixel_mask is None:
            pixel_mask = torch.ones(
                images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device
            )
        else:
            pixel_mask = pixel_mask.flatten(0, 1)[real]
        patch = self.model.config.vision_config.patch_size
        patches = pixel_mask.unfold(1, patch, patch).unfold(2, patch, patch)
        return self.encode_vision(images, patch_attention_mask=patches.sum(dim=(-1, -2)) > 0)
