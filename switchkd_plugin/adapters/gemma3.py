"""Adapter for transformers' ``Gemma3ForConditionalGeneration``.

The host's image path: SigLIP's last hidden state (after its final norm) -> the
``multi_modal_projector`` (average pooling of the patch grid to ``mm_tokens_per_image`` tokens,
RMSNorm, projection matrix). In the language model, image tokens attend to every token of their
own image block in both directions (``token_type_ids`` 1 on image tokens; the masks are built by
``Gemma3Model.forward``, the sliding-window layers' too).

Where the switch sits: after the vision tower, before the projector (pooling + norm +
projection is the teacher's). ``decode`` calls the host's ``Gemma3Model.forward`` with the
spliced embeddings and the token types of the spliced sequence, so the host itself builds the
bidirectional masks.
"""

from __future__ import annotations

from torch import Tensor, nn

from switchkd_plugin.adapters.base import MultimodalInputs
from switchkd_plugin.adapters.hf_family import ScatteredImageTokensAdapter


class Gemma3Adapter(ScatteredImageTokensAdapter):
    """Gemma 3: SigLIP -> pooling + RMSNorm + projection -> LM (bidirectional on images)."""

    host_class_name = "transformers.Gemma3ForConditionalGeneration"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        if softcap is not None:
            raise ValueError(
                f"final_logit_softcapping={softcap}: Switch-KD applies the plain lm_head to the "
                "decoder states, which would skip the host's logit soft-capping; set "
                "text_config.final_logit_softcapping to None (as Gemma 3 checkpoints have it)"
            )

    @property
    def vision_output_width(self) -> int:
        return self.model.config.vision_config.hidden_size

    @property
    def _projection_shape(self) -> tuple[int, int]:
        """[Dv, H]; under ZeRO-3 a partitioned weight keeps its full shape in ``ds_shape``."""
        weight = self.connector.mm_input_projection_weight
        return tuple(getattr(weight, "ds_shape", weight.shape))

    @property
    def connector_input_width(self) -> int:
        return self._projection_shape[0]

    @property
    def connector_output_width(self) -> int:
        return self._projection_shape[1]

    switch_config_fields = (
        *ScatteredImageTokensAdapter.switch_config_fields,
        "mm_tokens_per_image",
    )
    vision_switch_config_fields = (
        "vision_config.model_type",
        "vision_config.hidden_size",
        "vision_config.num_hidden_layers",
        "vision_config.intermediate_size",
    )

    def encode_vision(self, images: Tensor) -> Tensor:
        """[N, 3, s, s] -> SigLIP's last hidden state [N, P, Dv]."""
        return self.vision_module(
            pixel_values=self._vision_input(images), return_dict=True
        ).last_hidden_state

    def pathway_inputs(self, batch: dict, image_embeds: Tensor) -> MultimodalInputs:
        """The spliced embeddings, with the token types of the spliced sequence (1 on image
        features) for ``decode``."""
        inputs = super().pathway_inputs(batch, image_embeds)
        inputs.decoder_kwargs["token_type_ids"] = self.spliced_image_positions(batch).long()
        return inputs

    @property
    def decode_module(self) -> nn.Module:
        """The host's ``Gemma3Model``: ``decode`` runs its forward on the spliced embeddings, and
        it builds the causal, sliding and bidirectional-image masks from ``token_type_ids``."""
        return self.parts
