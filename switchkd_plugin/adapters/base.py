"""The host-independent view of a VLM that the distillation engine works with.

A VLM is vision encoder -> connector -> language model. Switch-KD needs each stage separately, so
that one model's vision output can go through another model's connector and LM. An adapter
exposes the stages of one host model class, each reproducing exactly what the host's own
``forward`` does, so ``lm_head(decode(build_inputs(ids, mask, labels, project(encode_vision(x)))))``
equals the host's logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from torch import Tensor, nn

from switchkd_plugin.adapters.splice import MultimodalInputs, SpliceRules, splice_image_features

__all__ = ["MultimodalInputs", "SpliceRules", "VLMAdapter"]


class VLMAdapter(ABC):
    """Stage-by-stage access to one host VLM (see the module docstring)."""

    images_key: ClassVar[str]  # batch key holding the images: "images" or "pixel_values"
    host_class_name: ClassVar[str]  # dotted name of the supported host class, for messages

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (matched on its class)."""
        return cls.supports_class(type(model))

    @classmethod
    @abstractmethod
    def supports_class(cls, model_class: type) -> bool:
        """Whether this adapter handles models of ``model_class``."""

    @classmethod
    def load_lora_base(cls, directory: Path, model_class: type, config) -> nn.Module | None:
        """The base model of the LoRA checkpoint in ``directory``, where the host saves the base
        weights inside it (``config``: the directory's own config, or None); None where the
        base is the checkpoint named by ``adapter_config.json``'s ``base_model_name_or_path``
        (a plain PEFT adapter directory)."""
        return None

    # ------------------------------------------------------------------------------ modules

    @property
    @abstractmethod
    def vision_module(self) -> nn.Module:
        """The vision encoder (for trainable-parameter checks)."""

    @property
    @abstractmethod
    def connector(self) -> nn.Module:
        """The connector / projector: vision features -> LM embeddings."""

    @property
    @abstractmethod
    def decoder(self) -> nn.Module:
        """The LM's base model: ``inputs_embeds`` -> final-norm hidden states."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module:
        """The output projection, weight [V, H]."""

    @property
    def input_embeddings(self) -> nn.Module:
        """The LM's token embedding, weight [V, H]."""
        return self.model.get_input_embeddings()

    # ------------------------------------------------------------------------------- widths

    @property
    @abstractmethod
    def vision_output_width(self) -> int:
        """Dv: last dim of ``encode_vision``'s output."""

    @property
    @abstractmethod
    def connector_input_width(self) -> int:
        """The feature width the connector was built for."""

    @property
    @abstractmethod
    def connector_output_width(self) -> int:
        """Last dim of ``project``'s output."""

    @property
    def lm_hidden_size(self) -> int:
        """H: the decoder's hidden size (``build_inputs`` expects features of this width)."""
        return self.decoder.config.hidden_size

    # -------------------------------------------------------------------------------- stages

    @abstractmethod
    def encode_vision(self, images: Tensor) -> Tensor:
        """[B, 3, h, w] -> vision-encoder output before the connector [B, P, Dv], with the
        host's feature layer and selection."""

    def project(self, features: Tensor) -> Tensor:
        """Connector: [B, P, Dv] -> [B, P', H]. Features from another model are cast to this
        connector's dtype and device (a no-op for the model's own features)."""
        weight = next(self.connector.parameters(), None)
        if weight is not None:
            features = features.to(device=weight.device, dtype=weight.dtype)
        return self.connector(features)

    @abstractmethod
    def splice_rules(self, attention_mask: Tensor) -> SpliceRules:
        """The host's placeholder convention and layout for a batch with this attention mask."""

    def build_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None,
        image_embeds: Tensor | Sequence[Tensor],
    ) -> MultimodalInputs:
        """Splice projected image features into the text embeddings, as the host's forward does.

        input_ids, attention_mask, labels: [B, T]; image_embeds: [N, P', H] or N tensors
        [P'_i, H], consumed in placeholder order. P' need not match the placeholder count.
        """
        return splice_image_features(
            input_ids,
            attention_mask,
            labels,
            image_embeds,
            self.input_embeddings,
            self.splice_rules(attention_mask),
        )

    # ------------------------------------------------------------------- batch-level stages
    # What the engine calls: each adapter reads the image inputs its host's collator produces
    # (pixel values and whatever goes with them), so no host-specific key lives in the engine.

    def vision_features(self, batch: dict) -> Tensor:
        """The vision-encoder output for a host batch (the input of ``project``)."""
        return self.encode_vision(batch[self.images_key])

    def pathway_inputs(self, batch: dict, image_embeds: Tensor) -> MultimodalInputs:
        """The decoder inputs of one pathway: this model's text embeddings of the batch with
        ``image_embeds`` (any pathway's projected features) spliced in."""
        return self.build_inputs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], image_embeds
        )

    def decode(self, inputs: MultimodalInputs) -> Tensor:
        """Decoder final hidden states (after the final norm, before ``lm_head``): [B, S, H]."""
        outputs = self.decoder(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
            return_dict=True,
        )
        return outputs.last_hidden_state
