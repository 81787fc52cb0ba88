"""Adapters for transformers' Qwen2.5-VL and Qwen3-VL (``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``).

Both keep the connector inside the vision model: ``visual.merger`` groups each
``spatial_merge_size**2`` consecutive ViT tokens and projects them to the LM width. The switch
point ``vision`` is therefore the ViT blocks' output, before the merger:

- Qwen2.5-VL: the blocks run on tokens in window order; the merger keeps that order and the
  model restores the raster order after it. The features carry their window order, so the
  teacher's merger output is put back in raster order exactly as the host does.
- Qwen3-VL: also the hidden states after the ``deepstack_visual_indexes`` blocks, which the
  ``deepstack_merger_list`` projects and the LM adds to its first layers' image positions. The
  teacher's deepstack mergers take the student's intermediate states.

Batches are what the Qwen processor makes: ``pixel_values`` [N_patches, C*T*p*p] with
``image_grid_thw`` [N_images, 3], ``input_ids`` with one ``image_token_id`` per merged token,
``mm_token_type_ids`` (transformers 5), ``attention_mask``, ``labels``. Positions are the
host's multimodal rope, from the model's own ``get_rope_index``.

Needs transformers 5 (``model.model.visual``, ``model.model.language_model``, a vision model
that returns its pre-merger ``last_hidden_state``); tested with 5.24.
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers
from packaging import version
from torch import Tensor, nn

from switchkd_plugin.adapters.base import MultimodalInputs, VLMAdapter

# Batch keys get_rope_index may take besides input_ids and attention_mask (by name: its
# signature changes between releases).
_ROPE_BATCH_KEYS = ("mm_token_type_ids", "image_grid_thw", "second_per_grid_ts")
_VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw")


@dataclass
class QwenVisionFeatures:
    """ViT output of a batch's images, before any merger.

    states: [N, Dv], the last block's output, N = sum of t*h*w over ``grid_thw``, in the
        order the blocks ran (window order for Qwen2.5-VL);
    grid_thw: [I, 3] patches per image (temporal, height, width);
    window_index: [N / merge_unit] the window permutation of merged tokens (Qwen2.5-VL), whose
        inverse restores raster order after the merger; None = already raster order;
    deepstack: per deepstack layer, that block's output [N, Dv] (Qwen3-VL; empty otherwise).
    """

    states: Tensor
    grid_thw: Tensor
    window_index: Tensor | None = None
    deepstack: tuple[Tensor, ...] = ()


@dataclass
class QwenImageEmbeds:
    """Merged image tokens in raster order, ready to replace the image placeholders.

    tokens: [M, H], M = N / merge_unit; deepstack: per deepstack layer, [M, H] (Qwen3-VL).
    """

    tokens: Tensor
    deepstack: tuple[Tensor, ...] = ()


class _QwenVLAdapter(VLMAdapter):
    """What Qwen2.5-VL and Qwen3-VL share: layout, placeholder splice, rope positions."""

    images_key: ClassVar[str] = "pixel_values"
    host_class_attr: ClassVar[str]  # the transformers class name

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        if version.parse(transformers.__version__).major < 5:
            raise TypeError(
                f"Switch-KD's {type(model).__name__} adapter needs transformers 5 (its vision "
                "model returns the pre-merger states; tested with 5.24), but transformers "
                f"{transformers.__version__} is installed: pip install -U transformers"
            )
        self._inner = model.model

    @classmethod
    def supports_class(cls, model_class: type) -> bool:
        host_class = getattr(transformers, cls.host_class_attr, None)
        return host_class is not None and issubclass(model_class, host_class)

    # ------------------------------------------------------------------------------ modules

    @property
    def vision_module(self) -> nn.Module:
        return self._inner.visual

    @property
    def connector(self) -> nn.Module:
        return self._inner.visual.merger

    @property
    def decoder(self) -> nn.Module:
        return self._inner.language_model

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def _vision_config(self):
        return self.model.config.vision_config

    @property
    def vision_output_width(self) -> int:
        return self._vision_config.hidden_size

    @property
    def connector_input_width(self) -> int:
        return self._vision_config.hidden_size  # the merger's norm runs on single ViT tokens

    @property
    def connector_output_width(self) -> int:
        return self._vision_config.out_hidden_size

    @property
    def _merge_unit(self) -> int:
        return self._vision_config.spatial_merge_size**2

    # The vision switch needs the same ViT: the student's tokens must be what the teacher's
    # merger groups and the teacher's deepstack layers expect.
    vision_switch_config_fields: ClassVar[tuple[str, ...]] = (
        "vision_config.depth",
        "vision_config.hidden_size",
        "vision_config.patch_size",
        "vision_config.temporal_patch_size",
        "vision_config.spatial_merge_size",
        "vision_config.in_channels",
    )

    # ------------------------------------------------------------------------------- stages

    def vision_features(self, batch: dict) -> QwenVisionFeatures | None:
        """ViT blocks' output for the batch's images (None for a batch without images)."""
        for key in _VIDEO_KEYS:
            if batch.get(key) is not None:
                raise ValueError(
                    f"the batch has {key!r}: Switch-KD's Qwen adapters distil images only; drop "
                    "the videos from the dataset"
                )
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            return None
        grid_thw = batch["image_grid_thw"]
        visual = self._inner.visual
        weight = next(visual.parameters())
        pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
        return self._run_vit(visual, pixel_values, grid_thw.to(weight.device))

    def placeholder_images(self) -> dict[str, Tensor]:
        """One blank image of the smallest grid, [1, m, m] patches (m = spatial_merge_size: one
        merged token): m² rows of C·T·p² zeros, as the processor flattens patches."""
        config = self._vision_config
        side = config.spatial_merge_size
        width = config.in_channels * config.temporal_patch_size * config.patch_size**2
        pixel_values = self._blank(side * side, width)
        grid = torch.tensor([[1, side, side]], device=pixel_values.device)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}

    @abstractmethod
    def _run_vit(
        self, visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor
    ) -> QwenVisionFeatures:
        """The family's ViT run: pixel_values [N, C*T*p*p], grid_thw [I, 3]."""

    def pathway_inputs(self, batch: dict, image_embeds: QwenImageEmbeds | None) -> MultimodalInputs:
        """Text embeddings with the merged tokens in the image placeholders (the host's
        ``masked_scatter``), the host's rope positions [3, B, S], decoder extras."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        embeds = self.input_embeddings(input_ids)
        image_mask = input_ids == self.image_token_id
        decoder_kwargs: dict[str, Any] = {}
        if image_embeds is not None:
            tokens = image_embeds.tokens.to(device=embeds.device, dtype=embeds.dtype)
            if int(image_mask.sum()) != tokens.shape[0]:
                raise ValueError(
                    f"the batch has {int(image_mask.sum())} image tokens (id "
                    f"{self.image_token_id}) but its images give {tokens.shape[0]} "
                    "merged tokens; build batches with the model's own processor"
                )
            embeds = embeds.masked_scatter(image_mask[..., None], tokens)
            decoder_kwargs = self._decoder_extras(image_mask, image_embeds, embeds.dtype)
        labels = batch.get("labels")
        if labels is None:
            labels = torch.full_like(input_ids, -100)
        return MultimodalInputs(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=self._positions(batch),
            decoder_kwargs=decoder_kwargs,
        )

    def _decoder_extras(
        self, image_mask: Tensor, image_embeds: QwenImageEmbeds, dtype: torch.dtype
    ) -> dict[str, Any]:
        return {}

    def _positions(self, batch: dict) -> Tensor | None:
        """The host's multimodal rope positions [3, B, S], from the model's ``get_rope_index``;
        None without images (the decoder then numbers tokens 0..S-1, as the host does)."""
        if batch.get("image_grid_thw") is None:
            return None
        rope_index = self._inner.get_rope_index
        accepted = inspect.signature(rope_index).parameters
        if "mm_token_type_ids" in accepted and batch.get("mm_token_type_ids") is None:
            raise ValueError(
                "the batch has images but no 'mm_token_type_ids', which "
                f"{type(self.model).__name__} needs for its 3D rope positions: the Qwen processor "
                "returns it; keep it in the collated batch (e.g. remove_unused_columns=False)"
            )
        kwargs = {
            key: batch[key]
            for key in _ROPE_BATCH_KEYS
            if key in accepted and batch.get(key) is not None
        }
        position_ids, _ = rope_index(
            batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs
        )
        return position_ids

    def _merge(self, merger: nn.Module, states: Tensor) -> Tensor:
        """One merger on ViT tokens [N, Dv] (another model's: cast to this merger's dtype)."""
        weight = next(merger.parameters())
        return merger(states.to(device=weight.device, dtype=weight.dtype))


class Qwen2_5_VLAdapter(_QwenVLAdapter):
    """Qwen2.5-VL: window-attention ViT -> ``visual.merger`` -> Qwen2 LM with 3D rope."""

    host_class_name: ClassVar[str] = "transformers.Qwen2_5_VLForConditionalGeneration"
    host_class_attr: ClassVar[str] = "Qwen2_5_VLForConditionalGeneration"
    vision_switch_config_fields = (
        *_QwenVLAdapter.vision_switch_config_fields,
        "vision_config.window_size",
        "vision_config.fullatt_block_indexes",
    )

    def _run_vit(self, visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor):
        from transformers.vision_utils import get_vision_window_index

        outputs = visual(pixel_values, grid_thw=grid_thw, return_dict=True)
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return QwenVisionFeatures(
            outputs.last_hidden_state, grid_thw, window_index.to(outputs.last_hidden_state.device)
        )

    def project(self, features: QwenVisionFeatures | None) -> QwenImageEmbeds | None:
        """This model's merger on (any same-family model's) ViT tokens, back in raster order:
        [N, Dv] -> [N / merge_unit, H]."""
        if features is None:
            return None
        merged = self._merge(self.connector, features.states)
        if features.window_index is not None:
            merged = merged[torch.argsort(features.window_index.to(merged.device))]
        return QwenImageEmbeds(merged)


class Qwen3VLAdapter(_QwenVLAdapter):
    """Qwen3-VL: ViT -> ``visual.merger`` (+ deepstack mergers on intermediate blocks) -> Qwen3
    LM with 3D rope, adding the deepstack embeddings to its first layers' image positions."""

    host_class_name: ClassVar[str] = "transformers.Qwen3VLForConditionalGeneration"
    host_class_attr: ClassVar[str] = "Qwen3VLForConditionalGeneration"
    vision_switch_config_fields = (
        *_QwenVLAdapter.vision_switch_config_fields,
        "vision_config.num_position_embeddings",
        "vision_config.deepstack_visual_indexes",
    )

    def _run_vit(self, visual: nn.Module, pixel_values: Tensor, grid_thw: Tensor):
        outputs = visual(pixel_values, grid_thw=grid_thw, output_hidden_states=True)
        # hidden_states[0] is the blocks' input; block i's output is hidden_states[i + 1]
        deepstack = tuple(outputs.hidden_states[i + 1] for i in visual.deepstack_visual_indexes)
        return QwenVisionFeatures(outputs.last_hidden_state, grid_thw, deepstack=deepstack)

    def project(self, features: QwenVisionFeatures | None) -> QwenImageEmbeds | None:
        """This model's merger and deepstack mergers on (any same-family model's) ViT states:
        [N, Dv] each -> [N / merge_unit, H] each."""
        if features is None:
            return None
        mergers = self._inner.visual.deepstack_merger_list
        if len(features.deepstack) != len(mergers):
            raise ValueError(
                f"{len(features.deepstack)} deepstack feature layers for {len(mergers)} deepstack "
                "mergers: the student's and teacher's vision_config.deepstack_visual_indexes differ"
            )
        return QwenImageEmbeds(
            self._merge(self.connector, features.states),
            tuple(
                self._merge(merger, states)
                for merger, states in zip(mergers, features.deepstack, strict=True)
            ),
        )

    def _decoder_extras(
        self, image_mask: Tensor, image_embeds: QwenImageEmbeds, dtype: torch.dtype
    ) -> dict[str, Any]:
        return {
            "visual_pos_masks": image_mask,
            "deepstack_visual_embeds": [embeds.to(dtype) for embeds in image_embeds.deepstack],
        }
