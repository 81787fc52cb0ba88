"""Adapter for transformers' ``LlavaOnevisionForConditionalGeneration``.

The host's image path: the SigLIP tower runs on every crop of every image (base view + anyres
crops, ``pixel_values`` [images, max_crops, 3, s, s] padded, the real count per image following
from ``image_sizes`` and ``batch_num_images``), hidden states of ``vision_feature_layer`` are
taken, the 2-layer MLP ``multi_modal_projector`` maps each crop token, then ``pack_image_features``
arranges each image's crops on its grid, unpads it to the original aspect ratio, downsamples it
past ``vision_aspect_ratio`` (bilinear) and appends ``image_newline`` after every row.

Where the switch sits: after the vision tower, before ``multi_modal_projector`` (the crop
features [crops, P, Dv]). The packing acts on *projected* features (LM width, with the LM-width
``image_newline``), so it is not part of the connector's input: it belongs to the pathway that
consumes the embeddings, and runs in ``pathway_inputs`` with that model's own ``image_newline``.
The switch pathway is thus student crops -> teacher projector -> teacher packing (teacher
newline) -> teacher LM; with ``--switch_point connector`` the student's projected crops are
packed by the teacher.
"""

from __future__ import annotations

import torch
from torch import Tensor

from switchkd_plugin.adapters.base import MultimodalInputs, placement
from switchkd_plugin.adapters.hf_family import ScatteredImageTokensAdapter
from switchkd_plugin.adapters.hf_llava import LlavaVisionFeatures


class LlavaOnevisionAdapter(LlavaVisionFeatures, ScatteredImageTokensAdapter):
    """LLaVA-OneVision: SigLIP -> MLP projector -> anyres packing with image_newline -> LM."""

    host_class_name = "transformers.LlavaOnevisionForConditionalGeneration"

    # Crop layout and packing: the same crops, grid and token count in both pathways.
    switch_config_fields = (
        *ScatteredImageTokensAdapter.switch_config_fields,
        "image_grid_pinpoints",
        "vision_aspect_ratio",
        "vision_feature_select_strategy",
    )
    # The teacher's projector expects the teacher's encoder.
    vision_switch_config_fields = (
        "vision_config.model_type",
        "vision_config.hidden_size",
        "vision_config.num_hidden_layers",
        "vision_config.intermediate_size",
        "vision_feature_layer",
    )

    # -------------------------------------------------------------------------------- stages

    def _crops_per_image(self, batch: dict) -> list[int]:
        """Crops of each image, as the host counts them (one for images of multi-image
        samples, which are not split)."""
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            image_size_to_num_patches,
        )

        config, image_sizes = self.model.config, batch["image_sizes"]
        per_sample = batch.get("batch_num_images")
        if per_sample is None:
            split = [True] * len(image_sizes)
        else:
            split = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            if should_split
            else 1
            for size, should_split in zip(image_sizes, split, strict=True)
        ]

    def placeholder_images(self) -> dict[str, Tensor]:
        """One blank S x S image (S the tower's input size): its crops [1, n, 3, S, S] (n as the
        host counts them for that size) and ``image_sizes`` [[S, S]]."""
        height, width = self._image_size
        sizes = torch.tensor([[height, width]])
        crops = self._crops_per_image({"image_sizes": sizes})[0]
        pixel_values = self._blank(1, crops, 3, height, width)
        return {"pixel_values": pixel_values, "image_sizes": sizes.to(pixel_values.device)}

    def vision_features(self, batch: dict) -> Tensor | None:
        """The real crops of ``pixel_values`` ([images, max_crops, 3, s, s] or [crops, 3, s, s])
        through the tower: [crops, P, Dv], image after image (None without images)."""
        if batch.get("pixel_values_videos") is not None:
            raise ValueError(
                "Switch-KD's LLaVA-OneVision adapter handles images; this batch has "
                "pixel_values_videos (distil video samples with --w_vsd 0 and --w_align 0)"
            )
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            return None
        if pixel_values.dim() == 5:
            crops = self._crops_per_image(batch)
            pixel_values = torch.cat(
                [image[:count] for image, count in zip(pixel_values, crops, strict=True)], dim=0
            )
        elif pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions"
            )
        return self.encode_vision(pixel_values)

    def pathway_inputs(self, batch: dict, image_embeds: Tensor | None) -> MultimodalInputs:
        """Projected crops [crops, P, H] packed per image with this model's ``image_newline``
        (the host's ``pack_image_features``), then spliced into this model's text."""
        if image_embeds is None:
            return super().pathway_inputs(batch, None)
        return super().pathway_inputs(batch, self._packed(image_embeds, batch))

    def placeholder_embeds(self, image_embeds: Tensor) -> Tensor:
        """The placeholder image's crops packed with ``image_newline`` as an image's are: on a
        rank without images, backward then reaches ``image_newline`` too."""
        return self._packed(image_embeds, self.placeholder_images())

    def _packed(self, image_embeds: Tensor, batch: dict) -> Tensor:
        """``image_embeds`` [crops, P, H] packed per image of ``batch`` (its ``image_sizes``)."""
        image_embeds = image_embeds.to(**placement(self.input_embeddings))
        per_image = image_embeds.split(self._crops_per_image(batch))
        newline = self.parts.image_newline
        # Used outside any module call, so ZeRO-3 never gathers it unless it is persistent.
        if getattr(newline, "ds_id", None) is not None and not getattr(newline, "ds_persist", 0):
            raise ValueError(
                "ZeRO-3 partitioned LLaVA-OneVision's image_newline, which the packing reads "
                "outside a module call; keep it whole: set zero_optimization."
                "stage3_param_persistence_threshold to at least the LM hidden size "
                f"({newline.ds_numel}; the 'auto' value is 10x that)"
            )
        packed, _ = self.parts.pack_image_features(
            per_image,
            batch["image_sizes"],
            image_newline=newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return packed
