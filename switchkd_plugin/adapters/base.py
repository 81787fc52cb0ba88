"""The host-independent view of a VLM that the distillation engine works with.

A VLM is vision encoder -> connector -> language model. Switch-KD needs each stage separately, so
that one model's vision output can go through another model's connector and LM. An adapter
exposes the stages of one host model class, each reproducing exactly what the host's own
``forward`` does, so ``lm_head(decode(pathway_inputs(batch, project(vision_features(batch)))))``
equals the host's logits.

What the engine calls (nothing else, so no host key or family name lives in the engine):

- ``vision_features(batch)``: the vision encoder's output for a batch as the host's processor or
  collator made it (each adapter reads its host's keys: ``pixel_values`` with
  ``image_grid_thw``, ``images``, ...). A tensor [B, P, Dv] by default; an adapter whose features
  are more than one tensor (window order and grid, deepstack layers) returns a small typed
  dataclass of its own. Whatever it returns, ``project`` of this adapter *and of the other
  model's adapter of the same family* must accept it: that is the visual switch.
- ``project(features)``: the connector, to the image embeddings ``pathway_inputs`` takes (a
  tensor by default, or an adapter's dataclass, e.g. merged tokens plus deepstack embeddings).
- ``pathway_inputs(batch, image_embeds)``: text embeddings with the image embeddings spliced in,
  and the host's own positions (e.g. Qwen's 3D rope from the model's rope-index function), as
  ``MultimodalInputs``; decoder extras go in ``MultimodalInputs.decoder_kwargs``. The embeddings
  may come from the other model (the switch), in another dtype: they are cast here.
- ``decode(inputs)``: the decoder to final-norm hidden states [B, S, H]; ``lm_head`` [V, H].
- ``placeholder_images()``: the image inputs of one blank image in the host's layout, for
  ``vision_features``: on several ranks a micro-batch without images runs it, so that every
  rank calls the vision encoder and connector alike (the engine ties it in with weight 0).

Before the first step, the trainer compares ``switch_fields`` of student and teacher (config
values the switch needs equal, e.g. depth, patch and merge size) and the widths.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from switchkd_plugin.adapters.splice import MultimodalInputs, SpliceRules, splice_image_features

__all__ = ["ImageEmbeds", "MultimodalInputs", "SpliceRules", "VLMAdapter", "VisionFeatures"]

# What ``vision_features`` returns and ``project`` takes: a Tensor [B, P, Dv] or an adapter's
# own dataclass. What ``project`` returns and ``pathway_inputs`` takes: a Tensor [N, P', H] (or
# N tensors [P'_i, H]) or an adapter's own dataclass.
VisionFeatures = Any
ImageEmbeds = Any


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
    def decoder_layers(self) -> Sequence[nn.Module]:
        """The decoder's transformer blocks, in order (what per-layer checkpointing wraps)."""
        layers = getattr(self.decoder, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"{type(self.decoder).__name__} keeps no `layers` list of decoder blocks, so the "
                "teacher cannot be checkpointed per layer: set --teacher_gradient_checkpointing "
                "False, or override `decoder_layers` in this host's adapter"
            )
        return layers

    @property
    def decode_module(self) -> nn.Module:
        """What ``decode`` runs on the spliced embeddings: the decoder; a host whose outer model
        builds the attention masks from ``decoder_kwargs`` (Gemma 3) names that model."""
        return self.decoder

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

    def encode_vision(self, images: Tensor) -> Tensor:
        """[B, 3, h, w] -> vision-encoder output before the connector [B, P, Dv], with the
        host's feature layer and selection. Hosts whose images need more than one tensor (a
        patch grid, sizes) override ``vision_features`` instead."""
        raise NotImplementedError(
            f"{type(self).__name__} encodes whole host batches: call vision_features(batch)"
        )

    def project(self, features: Tensor) -> Tensor:
        """The connector on vision features, of this model or of the other model of the switch.

        Args:
            features: ``vision_features``'s output, [B, P, Dv] by default (an adapter's own
                dataclass where it overrides this); cast to this connector's dtype and device
                (a no-op for the model's own features).

        Returns:
            Image embeddings [B, P', H] by default (an adapter's own dataclass where it
            overrides this), the input of ``pathway_inputs``.
        """
        weight = next(self.connector.parameters(), None)
        if weight is not None:
            features = features.to(device=weight.device, dtype=weight.dtype)
        return self.connector(features)

    def splice_rules(self, attention_mask: Tensor) -> SpliceRules:
        """The host's placeholder convention and layout for a batch with this attention mask
        (for ``build_inputs``; hosts that splice otherwise override ``pathway_inputs``)."""
        raise NotImplementedError(
            f"{type(self).__name__} splices whole host batches: call pathway_inputs(batch, embeds)"
        )

    def build_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None,
        image_embeds: Tensor | Sequence[Tensor],
    ) -> MultimodalInputs:
        """Splice projected image features into the text embeddings, as the host's forward does
        (by ``splice_rules``).

        Args:
            input_ids: [B, T] token ids with the host's image placeholders.
            attention_mask: [B, T], 1 on real tokens.
            labels: [B, T] (``IGNORE_INDEX`` where unsupervised), or None (nothing supervised).
            image_embeds: [N, P', H] or N tensors [P'_i, H], consumed in placeholder order;
                P' need not match the placeholder count.

        Returns:
            ``MultimodalInputs``: ``inputs_embeds`` [B, S, H], ``attention_mask`` [B, S],
            ``position_ids`` [B, S] and ``labels`` [B, S] of the spliced sequence.
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

    def vision_features(self, batch: dict) -> VisionFeatures | None:
        """The vision-encoder output for a host batch (the input of ``project``).

        Args:
            batch: a batch as the host's processor or collator made it; by default its
                ``images_key`` [B, 3, h, w] is read.

        Returns:
            ``encode_vision(batch[images_key])`` [B, P, Dv] by default (an adapter's own
            dataclass where its features are more than one tensor); None for a batch without
            images (text only: the host's forward makes no vision call either).
        """
        images = batch.get(self.images_key)
        return None if images is None else self.encode_vision(images)

    def placeholder_images(self) -> dict[str, Tensor]:
        """The image inputs of one blank image as the host's processor lays them out.

        Returns:
            Only the image keys (``vision_features`` takes them as a batch), on the vision
            encoder's device and dtype. By default ``{images_key: zeros [1, 3, S, S]}``, S the
            vision config's ``image_size``.
        """
        height, width = self._image_size
        return {self.images_key: self._blank(1, 3, height, width)}

    @property
    def _image_size(self) -> tuple[int, int]:
        """(height, width) of the vision encoder's input images (``vision_config.image_size``)."""
        size = self.model.config.vision_config.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _blank(self, *shape: int) -> Tensor:
        """Zeros of ``shape`` on the vision encoder's device, in its dtype."""
        return torch.zeros(shape, **placement(self.vision_module))

    def placeholder_embeds(self, image_embeds: ImageEmbeds) -> Any:
        """What this model makes of a placeholder image's connector output before splicing it
        (the engine adds it to a text-only pathway times 0, on several ranks: backward then
        reaches every parameter an image's would). By default the output itself."""
        return image_embeds

    def pathway_inputs(self, batch: dict, image_embeds: ImageEmbeds | None) -> MultimodalInputs:
        """The decoder inputs of one pathway: this model's text embeddings of the batch with
        the image embeddings spliced in.

        Args:
            batch: the host batch; by default ``input_ids``, ``attention_mask``, ``labels``
                [B, T] are read.
            image_embeds: ``project``'s output of either model of the switch, cast to this
                model's dtype: [N, P', H] or N tensors [P'_i, H] by default; None for a batch
                without images.

        Returns:
            ``MultimodalInputs`` of the spliced sequence: ``inputs_embeds`` [B, S, H],
            ``attention_mask``, ``position_ids``, ``labels`` [B, S] (Qwen: position_ids
            [3, B, S]) and the decoder's extra keyword arguments.
        """
        if image_embeds is None:
            image_embeds = ()
        return self.build_inputs(
            batch["input_ids"], batch["attention_mask"], batch["labels"], image_embeds
        )

    # ----------------------------------------------------------------- text-only samples

    @property
    def image_token_id(self) -> int:
        """The id that marks an image in ``input_ids``."""
        raise NotImplementedError(f"{type(self).__name__} names no image token id")

    def image_samples(self, batch: dict) -> Tensor:
        """The samples that hold an image (an image token among their attended tokens). The
        switch pass runs on these only: a text-only sample's switch rows would be its teacher
        rows.

        Args:
            batch: the host batch; ``input_ids`` and ``attention_mask`` [B, T] are read.

        Returns:
            [B] bool.
        """
        tokens = (batch["input_ids"] == self.image_token_id) & batch["attention_mask"].bool()
        return tokens.any(dim=1)

    def select_samples(
        self, batch: dict, keep: Tensor, images: VisionFeatures | ImageEmbeds
    ) -> tuple[dict, VisionFeatures | ImageEmbeds]:
        """The sub-batch of the samples ``keep`` and their part of ``images``.

        Args:
            batch: the host batch.
            keep: [B] bool; must hold every image of the batch (``image_samples``).
            images: this batch's vision features or projected embeddings.

        Returns:
            (the sub-batch, its images). By default the per-sample tensors (``per_sample_keys``,
            [B, ...]) are cut to [B', ...] and the images kept whole: the other samples have
            none.
        """
        sub = {
            key: value[keep] if key in self.per_sample_keys and value is not None else value
            for key, value in batch.items()
        }
        return sub, images

    # The batch keys holding one row per sample (text-aligned or per-sample counts).
    per_sample_keys: ClassVar[tuple[str, ...]] = (
        "input_ids",
        "attention_mask",
        "labels",
        "token_type_ids",
        "mm_token_type_ids",
        "batch_num_images",
    )

    def decode(self, inputs: MultimodalInputs) -> Tensor:
        """The decoder (``decode_module``) on one pathway's inputs.

        Args:
            inputs: ``pathway_inputs``'s output (``inputs_embeds`` [B, S, H], ``attention_mask``
                [B, S], ``position_ids``, ``decoder_kwargs``).

        Returns:
            Final hidden states [B, S, H]: after the final norm, before ``lm_head``.
        """
        outputs = self.decode_module(
            inputs_embeds=inputs.inputs_embeds,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            use_cache=False,
            return_dict=True,
            **inputs.decoder_kwargs,
        )
        return outputs.last_hidden_state

    def generate_new_tokens(self, prompts: dict, **generate_kwargs) -> Tensor:
        """`[B, N]` the tokens the model's `generate` adds to left-padded `prompts` (a batch
        without labels). HF models take `input_ids` and return them with the new tokens."""
        new = self.model.generate(**prompts, **generate_kwargs)
        return new[:, prompts["input_ids"].shape[1] :]

    # ------------------------------------------------------------------------ pre-flight

    # Config values that must be equal in student and teacher for the switch, as dotted names on
    # the model's config (as the user finds them there, e.g. "vision_config.depth"): for either
    # switch point, and in addition for the vision switch (where the teacher's connector takes
    # the student's encoder output).
    switch_config_fields: ClassVar[tuple[str, ...]] = ()
    vision_switch_config_fields: ClassVar[tuple[str, ...]] = ()

    def switch_fields(self, switch_point: str) -> dict[str, Any]:
        """Config values that must be equal in student and teacher for the switch at
        ``switch_point`` ("vision" or "connector"), beyond the widths ``check_switch_widths``
        compares: name -> value (None where the config lacks it; lists and tuples alike). The
        fields the adapter declares in ``switch_config_fields`` (and, for "vision",
        ``vision_switch_config_fields``); none by default."""
        names = self.switch_config_fields
        if switch_point == "vision":
            names += self.vision_switch_config_fields
        return {name: _as_plain(_config_value(self.model.config, name)) for name in names}


def placement(module: nn.Module) -> dict[str, Any]:
    """``device`` and ``dtype`` of ``module``'s first parameter, for ``Tensor.to``. Read from
    ``parameters()``, never as ``module.weight``: under ZeRO-3 that attribute, read during a
    forward, all-gathers the weight on the ranks that reach the line only (a collective the
    others do not make when their batch takes another path, e.g. one without images)."""
    weight = next(module.parameters())
    return {"device": weight.device, "dtype": weight.dtype}


def _config_value(config: Any, dotted_name: str) -> Any:
    """``config.<a>.<b>`` for "a.b"; None where any part is missing."""
    value = config
    for name in dotted_name.split("."):
        value = getattr(value, name, None)
    return value


def _as_plain(value: Any) -> Any:
    """Config values as comparable plain values (lists and tuples alike)."""
    return list(value) if isinstance(value, (list, tuple)) else value
