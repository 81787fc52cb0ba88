"""Splice projected image features into text embeddings: one function for every host.

It follows TinyLLaVA Factory's ``prepare_inputs_labels_for_multimodal``: drop padding, replace
each image placeholder by that image's features (labels -100 there), truncate, re-pad on the
configured side, and rebuild the attention mask and position ids. HF LLaVA's merge gives the same
sequence at every attended position. The number of features per image is taken from the features,
never from the placeholder, so pathways whose connectors emit different token counts share the
same text and the same supervised label sequence (up to truncation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100


@dataclass
class MultimodalInputs:
    """Decoder inputs with the image features spliced in.

    ``labels`` are -100 on image features, padding and anything else not supervised; positions of
    the same text token differ between pathways whose connectors emit different token counts, so
    align pathways through their labels, never by index.

    ``position_ids`` is [B, S], or the host's own layout (Qwen's multimodal rope: [3, B, S]).
    ``decoder_kwargs`` are further keyword arguments of the host's decoder call, e.g. Qwen3-VL's
    deepstack features (``visual_pos_masks``, ``deepstack_visual_embeds``); empty for most hosts.
    """

    inputs_embeds: Tensor  # [B, S, H]
    attention_mask: Tensor  # [B, S], the dtype of the attention mask passed in
    labels: Tensor  # [B, S], -100 = not supervised
    position_ids: Tensor | None  # [B, S], or the host's layout (see above)
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SpliceRules:
    """How a host marks images in ``input_ids`` and lays out the spliced sequence."""

    placeholder_id: int
    # HF LLaVA: a maximal run of placeholder ids is one image (one id, or pre-expanded to the
    # feature count). TinyLLaVA: every placeholder id is one image.
    merge_runs: bool
    # TinyLLaVA: a sample without a placeholder still consumes one image (its collator adds a
    # dummy image to text-only samples); HF LLaVA: only placeholders consume images.
    text_only_consumes_image: bool
    padding_side: str = "right"
    max_length: int | None = None  # truncate spliced sequences (TinyLLaVA's model_max_length)


def infer_padding_side(attention_mask: Tensor) -> str:
    """ "left" when some row starts with padding and every row ends with a real token."""
    mask = attention_mask.bool()
    left = bool((~mask[:, 0]).any()) and bool(mask[:, -1].all())
    return "left" if left else "right"


def placeholder_spans(ids: Tensor, rules: SpliceRules) -> list[tuple[int, int]]:
    """[T] token ids -> one half-open (start, end) span per image, in order."""
    spans: list[tuple[int, int]] = []
    for pos in torch.nonzero(ids == rules.placeholder_id).flatten().tolist():
        if rules.merge_runs and spans and spans[-1][1] == pos:
            spans[-1] = (spans[-1][0], pos + 1)
        else:
            spans.append((pos, pos + 1))
    return spans


def _splice_row(
    text_embeds: Tensor,
    labels: Tensor,
    spans: list[tuple[int, int]],
    images: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """One unpadded row: text_embeds [T, H], labels [T], spans and their images [P_i, H] ->
    embeds [S, H], labels [S]. An image without a span (a text-only TinyLLaVA sample) is appended
    with zero length, as the Factory does, so every parameter stays in the graph."""
    embeds, new_labels, cursor = [], [], 0
    for (start, end), image in zip(spans, images, strict=False):
        ignored = torch.full(
            (image.shape[0],), IGNORE_INDEX, dtype=labels.dtype, device=labels.device
        )
        embeds += [text_embeds[cursor:start], image.to(text_embeds.dtype)]
        new_labels += [labels[cursor:start], ignored]
        cursor = end
    embeds.append(text_embeds[cursor:])
    new_labels.append(labels[cursor:])
    embeds += [image[:0].to(text_embeds.dtype) for image in images[len(spans) :]]
    return torch.cat(embeds), torch.cat(new_labels)


def splice_image_features(
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor | None,
    image_embeds: Tensor | Sequence[Tensor],
    embed_tokens: nn.Module,
    rules: SpliceRules,
) -> MultimodalInputs:
    """Splice images into the text of a batch.

    input_ids, attention_mask, labels: [B, T] (labels None = nothing supervised);
    image_embeds: [N, P, H] or N tensors [P_i, H], one per placeholder span, in order;
    embed_tokens: the LM's token embedding. Returns a batch of length
    S = min(max_length, longest spliced row), padded on ``rules.padding_side`` with zero
    embeddings, mask 0, label -100, position 0.
    """
    mask = attention_mask.bool()
    if labels is None:
        labels = torch.full_like(input_ids, IGNORE_INDEX)
    spans = [
        placeholder_spans(ids[row_mask], rules)
        for ids, row_mask in zip(input_ids, mask, strict=True)
    ]
    counts = [max(len(row_spans), int(rules.text_only_consumes_image)) for row_spans in spans]
    if sum(counts) != len(image_embeds):
        raise ValueError(
            f"the batch's image placeholders (id {rules.placeholder_id}) call for {sum(counts)} "
            f"images, but {len(image_embeds)} image feature tensors were given"
        )
    # One embedding call for the batch (a placeholder id may be out of range, e.g. -200); the
    # placeholder rows are dropped below, so their zero gradient changes nothing.
    text_embeds = embed_tokens(input_ids.masked_fill(input_ids == rules.placeholder_id, 0))

    rows, next_image = [], 0
    for b, (row_spans, count) in enumerate(zip(spans, counts, strict=True)):
        images = [image_embeds[i] for i in range(next_image, next_image + count)]
        next_image += count
        rows.append(_splice_row(text_embeds[b][mask[b]], labels[b][mask[b]], row_spans, images))
    if rules.max_length is not None:
        rows = [(e[: rules.max_length], lab[: rules.max_length]) for e, lab in rows]
    return _pad_rows(rows, rules.padding_side, attention_mask.dtype)


def _pad_rows(
    rows: list[tuple[Tensor, Tensor]], padding_side: str, mask_dtype: torch.dtype
) -> MultimodalInputs:
    """Rows (embeds [S_i, H], labels [S_i]) -> a batch padded to the longest row."""
    batch, width = len(rows), max(row_embeds.shape[0] for row_embeds, _ in rows)
    device = rows[0][0].device
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=rows[0][1].dtype, device=device)
    attention_mask = torch.zeros(batch, width, dtype=torch.bool, device=device)
    position_ids = torch.zeros(batch, width, dtype=torch.long, device=device)
    embeds = []
    for b, (row_embeds, row_labels) in enumerate(rows):
        length = row_embeds.shape[0]
        pad = row_embeds.new_zeros(width - length, row_embeds.shape[1])
        if padding_side == "left":
            embeds.append(torch.cat([pad, row_embeds]))
            span = slice(width - length, width)
        else:
            embeds.append(torch.cat([row_embeds, pad]))
            span = slice(0, length)
        labels[b, span] = row_labels
        attention_mask[b, span] = True
        position_ids[b, span] = torch.arange(length, device=device)
    return MultimodalInputs(
        inputs_embeds=torch.stack(embeds),
        attention_mask=attention_mask.to(mask_dtype),
        labels=labels,
        position_ids=position_ids,
    )
