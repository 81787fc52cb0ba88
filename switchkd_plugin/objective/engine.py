"""The Switch-KD objective on one batch: teacher, student and visual-switch passes (docs/method.md).

    feats = V_S(x)                                  computed once, shared by two pathways
    z_S   = L_S(P_S(feats), text)                   student
    z_T   = L_T(P_T(V_T(x)), text)                  teacher, no grad
    z_W   = L_T(P_T(feats), text)                   switch ("vision"), or L_T(P_S(feats))
    loss  = w_ce CE(z_S) + w_align D(z_S, z_T) + w_vsd D(z_W, z_T)

Each decoder runs to hidden states; only rows whose shifted label is supervised go through an
lm_head, in chunks, so `[batch, seq, vocab]` logits never exist; each chunk's gradient is taken
as its loss is known (`loss_stage.py`), so no lm_head runs again in backward. Pathways may place
image tokens differently, so rows are matched by (sample, rank among the sample's supervised
tokens).

Text-only samples: their switch rows would be their teacher rows (no image to switch), so the
switch pass runs on the samples with an image only, and VSD (its sum, row count `vsd_tokens`
and k statistics) covers their rows only. What that saves: a batch without any image sample
skips the switch pass (one teacher decoder forward and backward); a mixed batch runs it on the
image samples' rows only, and their teacher lm_head rows only.

A micro-batch without images on several ranks: the host would skip the vision encoders and
connectors, while ranks with images call them, so ZeRO-3 (which gathers parameters per module
call, in forward and backward) would deadlock and DDP without `find_unused_parameters` would
fail. There each model's vision encoder runs on one blank image instead (the adapter's
`placeholder_images`), and its connector (the teacher's in the switch pass too) on those
features; the embeddings are not spliced (the text has no image token) but added to the
pathway's input embeddings times 0, so every rank makes the same calls in forward and backward
and the loss and gradients are exactly unchanged. Cost: one blank image through each model's
vision encoder and connector per text-only micro-batch, on several ranks only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from switchkd_plugin.adapters import MultimodalInputs, VLMAdapter
from switchkd_plugin.adapters.base import VisionFeatures
from switchkd_plugin.constants import IGNORE_INDEX
from switchkd_plugin.losses import KStats
from switchkd_plugin.losses.dbild import LedTopK
from switchkd_plugin.objective.divergences import DBiLDTerm, Divergence
from switchkd_plugin.objective.layer_checkpoint import checkpoint_each_layer
from switchkd_plugin.objective.loss_stage import chunked_loss
from switchkd_plugin.objective.teacher_calls import TeacherCalls


@dataclass
class ResponseRows:
    """The decoder states that predict a supervised token, in (sample, position) order."""

    hidden: Tensor  # [n, H]
    targets: Tensor  # [n] the token each row predicts
    counts: Tensor  # [B] supervised tokens per sample

    @classmethod
    def from_pathway(cls, hidden: Tensor, labels: Tensor) -> ResponseRows:
        """hidden `[B, S, H]`, labels `[B, S]` -> the rows at shifted supervised positions."""
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        return cls(hidden[:, :-1][supervised], targets[supervised], supervised.sum(1))

    def spread(self, keep: Tensor) -> ResponseRows:
        """These rows, of the sub-batch of samples ``keep`` [B] bool, as rows of the whole
        batch in which the other samples have none."""
        counts = self.counts.new_zeros(keep.numel())
        counts[keep] = self.counts
        return ResponseRows(self.hidden, self.targets, counts)

    def aligned_to(self, reference: ResponseRows) -> tuple[Tensor, Tensor]:
        """This pathway's rows laid out in `reference`'s row order.

        Returns `hidden [n_ref, H]` and `valid [n_ref]`: row r of the reference (sample b, the
        i-th supervised token of b) maps to this pathway's i-th supervised token of b, when it
        has one (truncation can cut pathways with more image tokens shorter).
        """
        sample = torch.repeat_interleave(
            torch.arange(reference.counts.numel(), device=reference.counts.device),
            reference.counts,
        )
        starts = reference.counts.cumsum(0) - reference.counts
        rank = torch.arange(sample.numel(), device=sample.device) - starts[sample]
        valid = rank < self.counts[sample]
        own_starts = self.counts.cumsum(0) - self.counts
        index = (own_starts[sample] + rank).clamp(max=max(self.targets.numel() - 1, 0))
        if self.targets.numel() and not torch.equal(
            self.targets[index][valid], reference.targets[valid]
        ):
            raise RuntimeError(
                "teacher and student pathways disagree on the response tokens of this batch: "
                "both models must see the same input_ids and labels"
            )
        if self.targets.numel():
            return self.hidden[index], valid
        # No rows here: zeros, still connected to this pathway's graph, so that its backward runs
        # on every rank alike (ZeRO-3 gathers the teacher's parameters collectively there).
        empty = self.hidden.new_zeros(sample.numel(), self.hidden.shape[-1])
        return empty + self.hidden.sum() * 0, valid


@dataclass
class SwitchSamples:
    """The samples one step's switch pass runs on, and whether their rows are distilled."""

    keep: Tensor  # [B] bool
    distilled: bool


@dataclass
class StepTerms:
    """Sums over one micro-batch, before normalisation by the response-token count."""

    loss: Tensor  # 0-dim: w_ce·ce + w_align·align + w_vsd·vsd, with grad
    ce: Tensor  # 0-dim sums, detached
    align: Tensor | None
    vsd: Tensor | None
    response_tokens: int  # student rows under CE
    distilled_tokens: int  # rows under align (every distillation term but VSD)
    vsd_tokens: int = 0  # rows under VSD: the image samples' distilled rows
    k_stats: dict[str, KStats] = field(default_factory=dict)  # "align" / "vsd" (DBiLD terms)


@dataclass(frozen=True)
class EngineOptions:
    """What the engine computes, as Liger's chunked losses take their chunk size, temperature
    and weights. `switchkd_plugin.training.setup.engine_options` builds it from the run's
    `SwitchKDArguments`.

    Args:
        vocab: logits columns the distillation terms compare (the shared tokenizer vocabulary;
            lm_heads may be padded beyond it).
        align: the divergence D of the align term D(student, teacher).
        vsd: the divergence D of the visual-switch term D(switch, teacher).
        w_ce, w_align, w_vsd: the terms' weights; 0 skips a distillation term's pass.
        switch_point: where the student's features enter the teacher: "vision" (its vision
            encoder's output, into the teacher's connector) or "connector" (its connector's
            output, into the teacher's decoder).
        run_switch: whether the switch pass may run (False: the student's vision encoder is
            frozen, so the term teaches nothing).
        chunk_size: response rows per lm_head chunk (0: all rows in one chunk).
        checkpoint_teacher_layers: recompute each teacher decoder layer of the switch pass in
            backward (one boundary tensor per layer held).
    """

    vocab: int
    align: Divergence
    vsd: Divergence
    w_ce: float
    w_align: float
    w_vsd: float
    switch_point: Literal["vision", "connector"]
    run_switch: bool
    chunk_size: int
    checkpoint_teacher_layers: bool

    @property
    def needs_teacher(self) -> bool:
        return self.w_align > 0 or self.w_vsd > 0

    @property
    def weights(self) -> tuple[float, float, float]:
        return self.w_ce, self.w_align, self.w_vsd


# A pathway's stages, lazily, for diagnosis: (stage name, its output).
Stages = Iterator[tuple[str, Any]]


class SwitchKDEngine:
    """Builds the three pathways of a batch and the weighted sum of their terms.

    Args:
        student, teacher: adapters of the two models (teacher None when no term needs it).
        options: what to compute (`EngineOptions`).
        agree_chunks: on several data-parallel ranks, maps this rank's number of lm_head chunks
            to the number every rank uses (e.g. an all-reduced maximum). Ranks with fewer rows
            run empty chunks, so each rank makes the same lm_head calls (ZeRO-3 gathers the
            parameters collectively at each) and uses every parameter (DDP, ZeRO-2), a rank
            without any response token included. Set, it also makes a micro-batch without
            images run the placeholder image (see the module docstring).
        teacher_calls: how the teacher's passes and lm_head are called (default: directly;
            `ShardedTeacherCalls` for a ZeRO-3 sharded teacher).
        sharded_student_head: for a student lm_head whose parameters are sharded (ZeRO-3), a
            context in which they hold their full values (gathered); the loss stage runs in it,
            and its backward reaches them through a call of the head (`loss_stage.py`).
    """

    def __init__(
        self,
        student: VLMAdapter,
        teacher: VLMAdapter | None,
        options: EngineOptions,
        agree_chunks: Callable[[int], int] | None = None,
        teacher_calls: TeacherCalls | None = None,
        sharded_student_head: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        if teacher is None and options.needs_teacher:
            raise ValueError("the align and switch terms need a teacher adapter")
        self.student, self.teacher, self.options = student, teacher, options
        if teacher_calls is None and teacher is not None:
            teacher_calls = TeacherCalls(teacher)
        self.teacher_calls = teacher_calls
        self.sharded_student_head = sharded_student_head
        self.agree_chunks = agree_chunks
        self.vocab = options.vocab
        self.run_align = teacher is not None and options.w_align > 0
        self.run_switch = teacher is not None and options.run_switch and options.w_vsd > 0
        used = (self.run_align, self.run_switch)
        pairs = zip((options.align, options.vsd), used, strict=True)
        terms = [term for term, in_use in pairs if in_use]
        # Both terms compare against the same teacher rows: one teacher-led top-k serves both.
        dbild = [t for t in terms if isinstance(t, DBiLDTerm) and t.teacher_led]
        same_rule = len(dbild) == 2 and dbild[0].rule == dbild[1].rule
        self.shared_teacher_rule = dbild[0].rule if same_rule else None

    # ------------------------------------------------------------------------------ stages
    # Each pathway: vision features -> connector -> decoder -> response rows -> lm_head (the
    # last in the loss stage). The passes below and `pathway_stages` run the same functions.

    def pathway_stages(self, batch: dict) -> Iterator[tuple[str, Stages]]:
        """Each pathway this engine runs on `batch`, for diagnosis (`diagnose.py`; run it under
        `torch.no_grad()`).

        Args:
            batch: as for `__call__`.

        Yields `(pathway, stages)` for "student", then "teacher" (when a distillation term
        runs) and "switch" (when the switch pass runs, here on every sample). `stages` runs the
        pathway lazily, yielding `(stage, output)`: "vision features" (the adapter's features,
        None without images), "connector output" (image embeddings), "decoder states"
        `[B, S, H]`, "logits" (the response rows' lm_head outputs, `[c, V]` chunks, lazily).
        A consumer that stops at a stage never runs the later ones.
        """
        features, placeholder = self._vision_features(self.student, batch)
        yield "student", self._stages(self.student, batch, features, placeholder, project=True)
        if self.run_align or self.run_switch:
            own, own_placeholder = self._vision_features(self.teacher, batch)
            yield "teacher", self._stages(self.teacher, batch, own, own_placeholder, project=True)
        if self.run_switch:
            vision = self.options.switch_point == "vision"
            images = features if vision else _project(self.student, features)
            yield "switch", self._stages(self.teacher, batch, images, placeholder, project=vision)

    def _stages(
        self, adapter: VLMAdapter, batch: dict, features, placeholder: bool, project: bool
    ) -> Stages:
        yield "vision features", features
        embeds = _project(adapter, features) if project else features
        yield "connector output", embeds
        hidden, labels = _decode(adapter, batch, embeds, placeholder)
        yield "decoder states", hidden
        rows = ResponseRows.from_pathway(hidden, labels).hidden
        chunks: Iterable[Tensor] = rows.split(self.options.chunk_size or max(len(rows), 1))
        yield "logits", (adapter.lm_head(part) for part in chunks)

    def _vision_features(
        self, adapter: VLMAdapter, batch: dict
    ) -> tuple[VisionFeatures | None, bool]:
        """The batch's vision features, and whether they are a blank image's (a placeholder).

        A batch without images gets None on one rank (no vision call, as in the host); on
        several ranks, the features of the adapter's `placeholder_images`, which the pathways
        add with weight 0 (`_pathway_inputs`): every rank calls the vision encoder and
        connector in forward and backward, as the ranks with images do."""
        features = adapter.vision_features(batch)
        if features is not None or self.agree_chunks is None:
            return features, False
        return adapter.vision_features(adapter.placeholder_images()), True

    def _switch_samples(self, batch: dict) -> SwitchSamples | None:
        """Which samples the switch pass runs on this step; None: it does not run.

        It runs on the samples with an image. On several ranks they agree first (the switch
        pass gathers a ZeRO-3 sharded teacher's parameters collectively): a rank without any
        image sample while another rank has some runs it on its first sample, distilling
        nothing from it, so that every rank makes the same teacher calls."""
        if not self.run_switch:
            return None
        keep = self.teacher.image_samples(batch)
        here = bool(keep.any())
        anywhere = here if self.agree_chunks is None else bool(self.agree_chunks(int(here)))
        if not anywhere:
            return None
        if here:
            return SwitchSamples(keep, distilled=True)
        first = torch.zeros_like(keep)
        first[0] = True
        return SwitchSamples(first, distilled=False)

    def _teacher_passes(
        self,
        batch: dict,
        features,
        embeds,
        placeholder: bool,
        rows: ResponseRows,
        switch: SwitchSamples | None,
    ) -> tuple[Tensor, ...]:
        """The teacher's rows `[n, H_T]` and the distilled-row mask `[n]` (bool), then, when
        the switch pass runs, its rows `[n, H_T]` and the VSD-row mask `[n]` (the switched
        samples' distilled rows); all laid out in the student's `rows` order. `placeholder`:
        the student's features are a blank image's (`_vision_features`)."""
        teacher_hidden, mask = self._teacher_rows(batch).aligned_to(rows)
        if switch is None:
            return teacher_hidden, mask
        switched = self._switch_rows(features, embeds, placeholder, batch, switch.keep)
        switched = switched.spread(switch.keep)
        switch_hidden, switch_valid = switched.aligned_to(rows)
        vsd_mask = mask & switch_valid if switch.distilled else torch.zeros_like(mask)
        return teacher_hidden, mask, switch_hidden, vsd_mask

    # ------------------------------------------------------------------------------ passes

    def _teacher_rows(self, batch: dict) -> ResponseRows:
        """The teacher pathway, no grad: its response rows `[n, H_T]`."""
        teacher = self.teacher
        with torch.no_grad():
            features, placeholder = self._vision_features(teacher, batch)
            embeds = _project(teacher, features)
            return ResponseRows.from_pathway(*_decode(teacher, batch, embeds, placeholder))

    def _switch_rows(
        self, student_features, student_embeds, placeholder: bool, batch: dict, keep: Tensor
    ) -> ResponseRows:
        """The switch pass on the samples `keep` [B] bool: their rows, in sample order."""
        teacher = self.teacher
        vision = self.options.switch_point == "vision"
        images = student_features if vision else student_embeds
        if not bool(keep.all()):
            batch, images = teacher.select_samples(batch, keep, images)
        # pathway_inputs casts the student's embeddings to the teacher's dtype
        embeds = _project(teacher, images) if vision else images
        per_layer = self.options.checkpoint_teacher_layers
        return ResponseRows.from_pathway(*_decode(teacher, batch, embeds, placeholder, per_layer))

    # ------------------------------------------------------------------------------ losses

    def _chunk_terms(
        self,
        student_logits: Tensor,
        switch_hidden: Tensor | None,
        targets: Tensor,
        teacher_hidden: Tensor | None,
        distill_mask: Tensor | None,
        vsd_mask: Tensor | None,
        teacher_head: Callable[[Tensor], Tensor] | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, dict[str, KStats | None]]]:
        """The loss stage on one chunk of rows, run once per chunk (`loss_stage`): the
        teacher's lm_head and the teacher-led top-k once, shared by align and VSD.

        Args:
            student_logits: `[c, V_student]` the student's lm_head on its rows (the loss
                stage computes them: `loss_stage.py`).
            switch_hidden: `[c, H_T]` switch-pass rows, or None (no switch pass).
            targets: `[c]` the token each row predicts.
            teacher_hidden: `[c, H_T]` teacher rows, or None (no distillation term).
            distill_mask, vsd_mask: `[c]` bool, the rows each term distils (VSD's among
                align's); None: every row.
            teacher_head: the teacher's lm_head, `[m, H_T] -> [m, V_T]`.

        Returns the weighted loss (0-dim, with grad) and, detached, the ce, align and vsd sums
        and the k statistics of the DBiLD terms.
        """
        ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
        align = vsd = ce.new_zeros(())
        stats: dict[str, KStats | None] = {}
        if teacher_hidden is None:
            return self._weighted(ce, align, vsd, stats)

        def distilled(logits: Tensor) -> Tensor:  # [c, V'] -> [n, vocab], the distilled rows
            logits = logits[:, : self.vocab]
            return logits if distill_mask is None else logits[distill_mask]

        with torch.no_grad():
            teacher_logits = distilled(teacher_head(teacher_hidden))
        teacher_led = None
        if self.shared_teacher_rule is not None:
            teacher_led = self.shared_teacher_rule.select(teacher_logits)
        parts = []
        if self.run_align:
            align_side = distilled(student_logits)
            parts.append(("align", self.options.align, align_side, teacher_logits, teacher_led))
        if switch_hidden is not None:
            # Only the VSD rows go through the teacher's lm_head (not a text-only sample's).
            within = (
                vsd_mask if distill_mask is None or vsd_mask is None else vsd_mask[distill_mask]
            )
            switch_rows = switch_hidden if vsd_mask is None else switch_hidden[vsd_mask]
            parts.append((
                "vsd",
                self.options.vsd,
                teacher_head(switch_rows)[:, : self.vocab],
                _pick(teacher_logits, within),
                None if teacher_led is None else _pick_led(teacher_led, within),
            ))  # fmt: skip
        values = {}
        for name, term, side, teacher_side, led in parts:
            if isinstance(term, DBiLDTerm):
                selection = term.select(side, teacher_side, led)
                values[name], stats[name] = term(side, selection)
            else:
                values[name], stats[name] = term(side, teacher_side), None
        return self._weighted(ce, values.get("align", align), values.get("vsd", vsd), stats)

    def _weighted(self, ce: Tensor, align: Tensor, vsd: Tensor, stats: dict):
        o = self.options
        loss = o.w_ce * ce + o.w_align * align + o.w_vsd * vsd
        return loss, (ce.detach(), align.detach(), vsd.detach(), stats)

    def __call__(self, batch: dict) -> StepTerms:
        """One micro-batch's Switch-KD terms.

        Args:
            batch: `input_ids`, `attention_mask`, `labels` `[B, T]` (`IGNORE_INDEX` where not
                supervised) and the images under the adapter's key (`images` /
                `pixel_values`, e.g. `[B, 3, h, w]`; absent for a text-only batch).

        Returns the terms as sums over the response rows (`StepTerms`): `loss` 0-dim with
        grad (its backward reaches the student, through the switch pass too), the detached
        ce / align / vsd sums, the row counts and DBiLD's k statistics.
        """
        student = self.student
        features, placeholder = self._vision_features(student, batch)
        embeds = _project(student, features)
        rows = ResponseRows.from_pathway(*_decode(student, batch, embeds, placeholder))

        switch = self._switch_samples(batch)
        teacher_hidden = switch_hidden = distill_mask = vsd_mask = teacher_head = None
        if self.run_align or switch is not None:
            passes = self.teacher_calls.run(
                lambda: self._teacher_passes(batch, features, embeds, placeholder, rows, switch)
            )
            teacher_hidden, distill_mask, *switched = passes
            switch_hidden, vsd_mask = switched if switched else (None, None)
            teacher_head = self.teacher_calls.lm_head()
        n = rows.targets.numel()
        distilled = 0 if teacher_hidden is None else _count(distill_mask, n)
        vsd_tokens = 0 if switch_hidden is None else _count(vsd_mask, n)
        # The usual case, every response row distilled: no masking.
        distill_mask = None if distilled == n else distill_mask
        vsd_mask = None if vsd_tokens == n else vsd_mask

        # A micro-batch without response rows still runs one (empty) chunk: every parameter
        # takes part in backward, as on the other ranks.
        chunk = self.options.chunk_size or max(n, 1)
        chunks = max(1, -(-n // chunk))
        if self.agree_chunks is not None:
            chunks = self.agree_chunks(chunks)

        def chunk_terms(student_logits: Tensor, switch_rows: Tensor | None, part: slice):
            return self._chunk_terms(
                student_logits,
                switch_rows,
                rows.targets[part],
                None if teacher_hidden is None else teacher_hidden[part],
                None if distill_mask is None else distill_mask[part],
                None if vsd_mask is None else vsd_mask[part],
                teacher_head,
            )

        head = self.student.lm_head
        sharded = self.sharded_student_head
        # The probe runs before the gather: the head's post-forward hook (ZeRO-3) would release
        # the parameters the gather holds for the chunks.
        probe = None if sharded is None else head(rows.hidden[:0])
        with nullcontext() if sharded is None else sharded():
            loss, extras = chunked_loss(
                chunk_terms, chunks, chunk, rows.hidden, switch_hidden, head, probe,
            )  # fmt: skip
        term_sums = [torch.stack(sums) for *sums, _ in extras]  # detached: for logging only
        stats_parts = [stats for *_, stats in extras]
        ce, align, vsd = torch.stack(term_sums).sum(0)
        return StepTerms(
            loss=loss,
            ce=ce,
            align=align if self.run_align else None,
            vsd=vsd if self.run_switch else None,
            response_tokens=n,
            distilled_tokens=distilled,
            vsd_tokens=vsd_tokens,
            k_stats=_concat_stats(stats_parts),
        )


def _project(adapter: VLMAdapter, features):
    """The connector stage: the adapter's connector; None (no image in the batch) stays None,
    as in the host."""
    return None if features is None else adapter.project(features)


def _decode(
    adapter: VLMAdapter, batch: dict, embeds, placeholder: bool, per_layer: bool = False
) -> tuple[Tensor, Tensor]:
    """The decoder stage of a pathway whose image embeddings are `embeds` (any model's
    connector output; None without images): its hidden states `[B, S, H]` and labels `[B, S]`
    (both laid out with this model's image tokens). `per_layer`: checkpoint each layer."""
    inputs = _pathway_inputs(adapter, batch, embeds, placeholder)
    with checkpoint_each_layer(adapter.decoder_layers) if per_layer else nullcontext():
        return adapter.decode(inputs), inputs.labels


def _pathway_inputs(
    adapter: VLMAdapter, batch: dict, embeds, placeholder: bool
) -> MultimodalInputs:
    """`adapter.pathway_inputs`. A placeholder's embeddings are left out of the text (it has no
    image token) and added to the input embeddings times 0: backward reaches the vision encoder
    and connector that made them, and nothing changes."""
    if not placeholder:
        return adapter.pathway_inputs(batch, embeds)
    # Before the text: the calls (and ZeRO-3 gathers) in the order an image's pathway makes them.
    zero = sum((part * 0).sum() for part in float_tensors(adapter.placeholder_embeds(embeds)))
    inputs = adapter.pathway_inputs(batch, None)
    inputs.inputs_embeds = inputs.inputs_embeds + zero.to(inputs.inputs_embeds)
    return inputs


def float_tensors(value) -> list[Tensor]:
    """The floating-point tensors in `value`: a tensor, a sequence or an adapter's dataclass."""
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() else []
    if dataclasses.is_dataclass(value):
        value = [getattr(value, item.name) for item in dataclasses.fields(value)]
    if isinstance(value, (list, tuple)):
        return [tensor for part in value for tensor in float_tensors(part)]
    return []


def _count(mask: Tensor | None, rows: int) -> int:
    return rows if mask is None else int(mask.sum())


def _pick(rows: Tensor, mask: Tensor | None) -> Tensor:
    return rows if mask is None else rows[mask]


def _pick_led(led: LedTopK, mask: Tensor | None) -> LedTopK:
    """The teacher-led branch of the rows `mask` (shared by align, taken by VSD on its rows)."""
    return led if mask is None else LedTopK(led.ids[mask], led.k[mask])


def _concat_stats(parts: list[dict[str, KStats]]) -> dict[str, KStats]:
    """Join the per-chunk k statistics of each term into one KStats per term."""
    out: dict[str, KStats] = {}
    for name in ("align", "vsd"):
        chunks = [part[name] for part in parts if part.get(name) is not None]
        if not chunks:
            continue

        def cat(side: str, chunks=chunks) -> Tensor | None:
            values = [getattr(c, side) for c in chunks if getattr(c, side) is not None]
            return torch.cat(values) if values else None

        out[name] = KStats(cat("teacher_k"), cat("student_k"), chunks[0].k_min)
    return out
