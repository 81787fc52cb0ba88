"""DBiLD: bidirectional logit-difference distillation with a dynamic (Kneedle) top-k.

Switch-KD's distillation divergence (docs/method.md). One function covers the ablation family:
BiLD (arXiv 2406.13555) is `k_mode="fixed", fixed_k=8, divergence="fkl"` with both directions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .kneedle import knee_k_from_sorted, resolve_k_bounds, window_width
from .pairwise import PAIR_KL
from .rows import check_choice, raise_if_non_finite, reduce_rows, select_rows

K_MODES = ("kneedle", "fixed")
DIVERGENCES = ("rkl", "fkl")
DIRECTIONS = ("both", "teacher", "student")
REDUCTIONS = ("mean", "sum", "none")
PAIR_ALGORITHMS = tuple(PAIR_KL)


@dataclass
class KStats:
    """The k chosen per distilled row by each led branch (None for a branch not computed).

    Kept as tensors so a caller can sum them over micro-batches before one host sync.
    """

    teacher_k: Tensor | None  # [n] int64
    student_k: Tensor | None  # [n] int64
    k_min: int

    def summary(self) -> dict[str, float]:
        """`k_{teacher,student}_{mean,min,max}` and `k_{...}_at_min` (share of rows at k_min)."""
        out: dict[str, float] = {}
        for side, k in (("teacher", self.teacher_k), ("student", self.student_k)):
            if k is None or k.numel() == 0:
                continue
            k = k.double()
            out[f"k_{side}_mean"] = k.mean().item()
            out[f"k_{side}_min"] = k.min().item()
            out[f"k_{side}_max"] = k.max().item()
            out[f"k_{side}_at_min"] = (k == self.k_min).double().mean().item()
        return out


@dataclass
class DBiLDOutput:
    loss: Tensor  # 0-dim for mean/sum, [n] for reduction="none"
    stats: KStats


@dataclass(frozen=True)
class _TopKRule:
    """How each led branch picks its ids: a fixed k, or the Kneedle k within the top `width`."""

    fixed_k: int | None
    width: int
    k_min: int
    k_max: int

    @classmethod
    def build(
        cls, vocab: int, k_mode: str, window: int, k_min: int, k_max: int | None, fixed_k: int
    ):
        if k_mode == "fixed":
            if not 2 <= fixed_k <= vocab:
                raise ValueError(f"fixed_k must be in [2, vocab size {vocab}], got {fixed_k}")
            return cls(fixed_k, fixed_k, fixed_k, fixed_k)
        width = window_width(vocab, window)
        return cls(None, width, *resolve_k_bounds(width, k_min, k_max))

    def select(self, leader: Tensor) -> tuple[Tensor, Tensor]:
        """Led ids `[n, K]` (descending leader order, K = max k) and each row's k `[n]`."""
        top = leader.topk(self.width, dim=-1, sorted=True)
        if self.fixed_k is not None:
            return top.indices, torch.full(
                top.indices.shape[:1], self.fixed_k, device=leader.device
            )
        k = knee_k_from_sorted(top.values, self.k_min, self.k_max)
        return top.indices[:, : int(k.max())], k


def dbild_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 3.0,
    k_mode: Literal["kneedle", "fixed"] = "kneedle",
    kneedle_window: int = 256,
    k_min: int = 2,
    k_max: int | None = None,
    fixed_k: int = 8,
    divergence: Literal["rkl", "fkl"] = "rkl",
    directions: Literal["both", "teacher", "student"] = "both",
    reduction: Literal["mean", "sum", "none"] = "mean",
    pair_algorithm: Literal["cumulative", "explicit"] = "cumulative",
    return_stats: bool = False,
    check_finite: bool = True,
) -> Tensor | DBiLDOutput:
    """DBiLD between student and teacher logits over the rows where `mask` is True.

    For each row, the teacher-led branch takes the teacher's top-k^t ids (descending teacher
    order) and compares the distributions over ordered pairs `i < j`, `P_ij ∝ exp((t_i - t_j)/τ)`
    (teacher) and `Q_ij ∝ exp((s_i - s_j)/τ)` (student); the student-led branch does the same on
    the student's top-k^s ids, whose student values keep their gradient (the ids do not).
    `divergence="rkl"` is `KL(Q || P)` (student side first), `"fkl"` is `KL(P || Q)`. The row
    loss is `L_t + L_s` (`directions="both"`), or one of them.

    BiLD (arXiv 2406.13555) is exactly `k_mode="fixed", fixed_k=8, divergence="fkl"`.

    Args:
        student_logits: `[..., V]`, any float dtype; differentiable.
        teacher_logits: `[..., V]`, same shape; detached here.
        mask: `[...]` bool, rows to distil (None = all). An all-False mask gives a loss of 0
            (connected to the graph, so `backward()` works and yields zero gradients).
        temperature: τ > 0, divides both sides' logits. No τ² rescaling is applied.
        k_mode: `kneedle` (k per row and side by the Kneedle rule) or `fixed` (`fixed_k` both ways).
        kneedle_window: top-N searched for the knee; `<= 0` = the whole vocabulary.
        k_min, k_max: clamp of the Kneedle k (`k_max=None` = the window). k = 2 has one pair and
            so contributes zero; `KStats` reports the share of rows at `k_min`.
        fixed_k: k of both branches when `k_mode="fixed"`.
        divergence: `rkl` | `fkl`. directions: `both` | `teacher` | `student`.
        reduction: `mean` over distilled rows, `sum`, or `none` (`[n]` per row).
        pair_algorithm: `cumulative` (exact, O(k) per row; the default) or `explicit` (all O(k^2)
            pairs materialised; the reference, never for training).
        return_stats: return a `DBiLDOutput(loss, stats)` with the k chosen per row and branch.
        check_finite: raise on a non-finite loss (naming the side); False returns it as is (the
            trainer then decides, identically on every rank, whether to stop or skip the batch).

    The loss is computed in float32 whatever the input dtype (float64 stays float64).
    Raises `ValueError` on mismatched shapes, unknown options, and NaN/inf logits (naming the side).
    """
    check_choice("k_mode", k_mode, K_MODES)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("directions", directions, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("pair_algorithm", pair_algorithm, PAIR_ALGORITHMS)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher = select_rows(student_logits, teacher_logits, mask)
    rule = _TopKRule.build(student.shape[-1], k_mode, kneedle_window, k_min, k_max, fixed_k)
    pair_kl = PAIR_KL[pair_algorithm]
    sides = [side for side in ("teacher", "student") if directions in ("both", side)]
    branch_k: dict[str, Tensor | None] = {"teacher": None, "student": None}
    if student.shape[0] == 0:
        per_row = student.sum(-1)  # [0]; keeps the graph connected so backward() works
    else:
        selections = [
            rule.select(teacher if side == "teacher" else student.detach()) for side in sides
        ]
        # One gather per side for both branches: backward then scatters into one [n, V] gradient.
        ids = torch.cat([branch_ids for branch_ids, _ in selections], dim=-1)
        widths = [branch_ids.shape[-1] for branch_ids, _ in selections]
        t_vals = (teacher.gather(-1, ids) / temperature).split(widths, dim=-1)
        s_vals = (student.gather(-1, ids) / temperature).split(widths, dim=-1)
        per_row = 0
        for side, (_, k), t, s in zip(sides, selections, t_vals, s_vals, strict=True):
            valid = torch.arange(t.shape[-1], device=k.device) < k[:, None]
            first, second = (s, t) if divergence == "rkl" else (t, s)
            per_row = per_row + pair_kl(first, second, valid)
            branch_k[side] = k
        if check_finite:
            raise_if_non_finite(per_row, student, teacher)
    stats = KStats(branch_k["teacher"], branch_k["student"], k_min)
    loss = reduce_rows(per_row, reduction)
    return DBiLDOutput(loss, stats) if return_stats else loss
