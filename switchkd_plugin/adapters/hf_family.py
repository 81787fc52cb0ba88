"""What the transformers VLM classes share, and what those with pre-expanded image tokens add.

``TransformersVLMAdapter``: the layout of transformers' VLM classes. The vision encoder, the
connector and the language model hang off an inner model (``parts``: ``model.model``, with
``part_names`` naming the three); the head is the model's output embedding; images are runs of
``config.image_token_id`` in ``input_ids``. HF LLaVA builds on it as it is (its ``pathway_inputs``
splices one image per run of image tokens, whatever the run's length).

``ScatteredImageTokensAdapter``: LLaVA-OneVision, InternVL, Gemma 3 and SmolVLM all end their
image path the same way: the connector's output, flattened over images (and crops), is written in
order into the positions of ``config.image_token_id``, which the processor repeated exactly as
often as there are features (``inputs_embeds.masked_scatter``). ``pathway_inputs`` therefore cuts
the flat features at the batch's runs of image tokens and splices each run with
``splice_image_features``: the host's sequence, position for position. The count must match, as
in the host; the switch needs the same vision encoder and token layout in both models anyway
(``switch_fields``). Each family's adapter supplies the vision encoder, the connector and the
fields the switch needs equal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import transformers
from torch import Tensor, nn

from switchkd_plugin.adapters.base import MultimodalInputs, SpliceRules, VLMAdapter, placement
from switchkd_plugin.adapters.splice import (
    infer_padding_side,
    placeholder_spans,
    splice_image_features,
)


class TransformersVLMAdapter(VLMAdapter):
    """Base of the adapters of transformers' VLM classes: components on ``parts``, head on the
    model, images as runs of ``image_token_id``."""

    images_key: ClassVar[str] = "pixel_values"
    host_class_name: ClassVar[str]  # "transformers.<Class>"
    # Attribute names of the vision encoder, the connector and the LM on `parts`.
    part_names: ClassVar[tuple[str, str, str]] = (
        "vision_tower",
        "multi_modal_projector",
        "language_model",
    )

    @classmethod
    def host_class(cls) -> type | None:
        """The transformers class, or None on releases without it."""
        return getattr(transformers, cls.host_class_name.rsplit(".", 1)[1], None)

    @classmethod
    def supports_class(cls, model_class: type) -> bool:
        host = cls.host_class()
        return host is not None and issubclass(model_class, host)

    @property
    def parts(self) -> nn.Module:
        """The inner model holding the vision tower, the connector and the language model."""
        return self.model.model

    @property
    def vision_module(self) -> nn.Module:
        return getattr(self.parts, self.part_names[0])

    @property
    def connector(self) -> nn.Module:
        return getattr(self.parts, self.part_names[1])

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.parts, self.part_names[2])

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def splice_rules(self, attention_mask: Tensor) -> SpliceRules:
        return SpliceRules(
            placeholder_id=self.image_token_id,
            merge_runs=True,
            text_only_consumes_image=False,
            padding_side=infer_padding_side(attention_mask),
        )

    def _vision_input(self, pixel_values: Tensor) -> Tensor:
        """Pixels on the vision encoder's device and dtype (the hosts leave fp32 pixels to the
        caller; a bf16 tower needs the cast)."""
        weight = next(self.vision_module.parameters())
        return pixel_values.to(device=weight.device, dtype=weight.dtype)


class ScatteredImageTokensAdapter(TransformersVLMAdapter):
    """Base of the adapters whose host scatters flat image features into its image tokens."""

    # The processor's image size and patch: the token count per image must match in both.
    switch_config_fields: ClassVar[tuple[str, ...]] = (
        "vision_config.image_size",
        "vision_config.patch_size",
    )

    # ------------------------------------------------------------------------------ splice

    def image_runs(self, batch: dict) -> list[int]:
        """Lengths of the runs of image tokens in the batch, row by row, in order."""
        rules = self.splice_rules(batch["attention_mask"])
        mask = batch["attention_mask"].bool()
        return [
            end - start
            for ids, row_mask in zip(batch["input_ids"], mask, strict=True)
            for start, end in placeholder_spans(ids[row_mask], rules)
        ]

    def split_at_image_tokens(
        self, batch: dict, image_embeds: Tensor | Sequence[Tensor]
    ) -> list[Tensor]:
        """Flat image embeddings ([N, P, H] or tensors [P_i, H], in the host's order) cut into
        one tensor per run of image tokens, cast to this LM's dtype and device."""
        parts = [image_embeds] if isinstance(image_embeds, Tensor) else list(image_embeds)
        flat = torch.cat([part.reshape(-1, part.shape[-1]) for part in parts])
        flat = flat.to(**placement(self.input_embeddings))
        runs = self.image_runs(batch)
        if sum(runs) != flat.shape[0]:
            raise ValueError(
                f"the batch has {sum(runs)} image tokens (id {self.image_token_id}) but the "
                f"connector produced {flat.shape[0]} image features; make the batch with the "
                "processor of the model whose vision encoder and connector run on it (same "
                "image size, crops and token count per image)"
            )
        return list(torch.split(flat, runs))

    def pathway_inputs(self, batch: dict, image_embeds: Any) -> MultimodalInputs:
        """The spliced batch; ``image_embeds`` None for a batch without images."""
        images = [] if image_embeds is None else self.split_at_image_tokens(batch, image_embeds)
        return self.build_inputs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], images
        )

    def spliced_image_positions(self, batch: dict) -> Tensor:
        """[B, S] bool: where ``pathway_inputs`` puts the image features (the same splice, on a
        one-wide marker instead of the embeddings)."""
        ids = batch["input_ids"]

        def no_text(token_ids: Tensor) -> Tensor:
            return torch.zeros(*token_ids.shape, 1, device=token_ids.device)

        markers = [torch.ones(length, 1, device=ids.device) for length in self.image_runs(batch)]
        spliced = splice_image_features(
            ids,
            batch["attention_mask"],
            None,
            markers,
            no_text,
            self.splice_rules(batch["attention_mask"]),
        )
        return spliced.inputs_embeds[..., 0] > 0.5
