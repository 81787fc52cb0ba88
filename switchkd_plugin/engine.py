"""The Switch-KD objective on one batch: teacher, student and visual-switch passes (DESIGN §2).

    feats = V_S(x)                                  computed once, shared by two pathways
    z_S   = L_S(P_S(feats), text)                   student
    z_T   = L_T(P_T(V_T(x)), text)                  teacher, no grad
    z_W   = L_T(P_T(feats), text)                   switch ("vision"), or L_T(P_S(feats))
    loss  = w_ce CE(z_S) + w_align D(z_S, z_T) + w_vsd D(z_W, z_T)

Each decoder runs to hidden states; only rows whose shifted label is supervised go through an
lm_head, in chunks, so `[batch, seq, vocab]` logits never exist. Pathways may place image tokens
differently, so rows are matched by (sample, rank among the sample's supervised tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .adapters import VLMAdapter
from .config import SwitchKDArguments
from .divergences import make_divergence
from .losses import KStats

IGNORE_INDEX = -100


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
class StepTerms:
    """Sums over one micro-batch, before normalisation by the response-token count."""

    loss: Tensor  # 0-dim: w_ce·ce + w_align·align + w_vsd·vsd, with grad
    ce: Tensor  # 0-dim sums, detached
    align: Tensor | None
    vsd: Tensor | None
    response_tokens: int  # student rows under CE
    distilled_tokens: int  # rows under the distillation terms
    k_stats: dict[str, KStats] = field(default_factory=dict)  # "align" / "vsd" (DBiLD terms)


class SwitchKDEngine:
    """Builds the three pathways of a batch and the weighted sum of their terms.

    Args:
        student, teacher: adapters of the two models (teacher None when no term needs it).
        args: the Switch-KD arguments.
        distill_vocab_size: logits columns compared by the distillation terms (the shared
            tokenizer vocabulary; lm_heads may be padded beyond it).
        run_switch: whether the switch pass runs (False when w_vsd = 0 or the student's vision
            encoder is frozen).
        one_chunk: exactly one lm_head call per pathway, even for a batch without response rows
            (ZeRO-3 on several ranks, where each call gathers parameters collectively and ranks
            making different numbers of calls, or in different orders, would deadlock).
    """

    def __init__(
        self,
        student: VLMAdapter,
        teacher: VLMAdapter | None,
        args: SwitchKDArguments,
        distill_vocab_size: int,
        run_switch: bool,
        one_chunk: bool = False,
    ) -> None:
        if teacher is None and args.needs_teacher:
            raise ValueError("the align and switch terms need a teacher adapter")
        self.student, self.teacher, self.args = student, teacher, args
        self.one_chunk = one_chunk
        self.vocab = distill_vocab_size
        self.run_align = teacher is not None and args.w_align > 0
        self.run_switch = teacher is not None and run_switch and args.w_vsd > 0
        self.align_divergence = make_divergence(args.align_loss, args)
        self.vsd_divergence = make_divergence(args.vsd_loss, args)

    # ------------------------------------------------------------------------------ passes

    def _teacher_rows(self, batch: dict) -> ResponseRows:
        teacher = self.teacher
        with torch.no_grad():
            features = teacher.vision_features(batch)
            inputs = teacher.pathway_inputs(batch, teacher.project(features))
            return ResponseRows.from_pathway(teacher.decode(inputs), inputs.labels)

    def _switch_rows(self, student_features, student_embeds, batch: dict) -> ResponseRows:
        teacher = self.teacher
        # pathway_inputs casts the student's embeddings to the teacher's dtype
        embeds = (
            teacher.project(student_features)
            if self.args.switch_point == "vision"
            else student_embeds
        )
        inputs = teacher.pathway_inputs(batch, embeds)
        if self.args.teacher_gradient_checkpointing:
            hidden = checkpoint(
                lambda e: teacher.decode(replace(inputs, inputs_embeds=e)),
                inputs.inputs_embeds,
                use_reentrant=False,
            )
        else:
            hidden = teacher.decode(inputs)
        return ResponseRows.from_pathway(hidden, inputs.labels)

    # ------------------------------------------------------------------------------ losses

    def _chunk_terms(
        self,
        student_hidden: Tensor,
        targets: Tensor,
        teacher_hidden: Tensor | None,
        switch_hidden: Tensor | None,
        distill_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, KStats | None]]:
        """Weighted loss, ce, align, vsd sums and k statistics over one chunk of rows `[c, H]`."""
        student_logits = self.student.lm_head(student_hidden)  # [c, V_student]
        ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
        align = vsd = ce.new_zeros(())
        stats: dict[str, KStats | None] = {}
        if teacher_hidden is not None:
            with torch.no_grad():
                teacher_logits = self.teacher.lm_head(teacher_hidden)[:, : self.vocab]
            if self.run_align:
                align, stats["align"] = self.align_divergence(
                    student_logits[:, : self.vocab], teacher_logits, distill_mask
                )
            if switch_hidden is not None:
                switch_logits = self.teacher.lm_head(switch_hidden)[:, : self.vocab]
                vsd, stats["vsd"] = self.vsd_divergence(switch_logits, teacher_logits, distill_mask)
        args = self.args
        loss = args.w_ce * ce + args.w_align * align + args.w_vsd * vsd
        return loss, ce.detach(), align.detach(), vsd.detach(), stats

    def __call__(self, batch: dict) -> StepTerms:
        """batch: `input_ids`, `attention_mask`, `labels` `[B, T]` and the images
        (`images` / `pixel_values` `[B, 3, h, w]`)."""
        student = self.student
        features = student.vision_features(batch)
        embeds = student.project(features)
        inputs = student.pathway_inputs(batch, embeds)
        student_states = student.decode(inputs)
        rows = ResponseRows.from_pathway(student_states, inputs.labels)

        teacher_hidden = switch_hidden = distill_mask = None
        if self.run_align or self.run_switch:
            teacher_hidden, distill_mask = self._teacher_rows(batch).aligned_to(rows)
            if self.run_switch:
                switch_hidden, switch_valid = self._switch_rows(features, embeds, batch).aligned_to(
                    rows
                )
                distill_mask = distill_mask & switch_valid
        if bool(distill_mask is not None and distill_mask.all()):
            distill_mask = None  # the usual case: every response row is distilled

        n = rows.targets.numel()
        if n == 0 and not self.one_chunk:  # every term is 0; backward still reaches the student
            zero = student_states.sum() * 0
            return StepTerms(zero, zero.detach(), None, None, 0, 0)
        chunk = max(n, 1) if self.one_chunk else (self.args.lm_head_chunk_size or n)
        chunks = -(-max(n, 1) // chunk)
        losses, term_sums, stats_parts = [], [], []
        for index in range(chunks):
            part = slice(index * chunk, (index + 1) * chunk)
            pieces = (
                rows.hidden[part],
                rows.targets[part],
                None if teacher_hidden is None else teacher_hidden[part],
                None if switch_hidden is None else switch_hidden[part],
                None if distill_mask is None else distill_mask[part],
            )
            if chunks > 1:  # keep one chunk's logits alive at a time; recompute them in backward
                loss, *sums, stats = checkpoint(self._chunk_terms, *pieces, use_reentrant=False)
            else:
                loss, *sums, stats = self._chunk_terms(*pieces)
            losses.append(loss)
            term_sums.append(torch.stack(sums))  # detached: for logging only
            stats_parts.append(stats)
        ce, align, vsd = torch.stack(term_sums).sum(0)
        distilled = n if distill_mask is None else int(distill_mask.sum())
        return StepTerms(
            loss=torch.stack(losses).sum(),
            ce=ce,
            align=align if self.run_align else None,
            vsd=vsd if self.run_switch else None,
            response_tokens=n,
            distilled_tokens=distilled if (self.run_align or self.run_switch) else 0,
            k_stats=_concat_stats(stats_parts),
        )


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
