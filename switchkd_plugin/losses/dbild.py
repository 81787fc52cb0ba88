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
from .rows import check_choice, raise_if_non_finite, reduce_rows, select_rows, upcast

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


@dataclass
class LedTopK:
    """The ids one led branch compares, for n rows: the leader's top-K in descending order,
    of which row r uses the first `k[r]`."""

    ids: Tensor  # [n, K] int64
    k: Tensor  # [n] int64


@dataclass(frozen=True)
class TopKRule:
    """How each led branch picks its ids: a fixed k, or the Kneedle k within the top `width`."""

    fixed_k: int | None
    width: int
    k_min: int
    k_max: int

    @classmethod
    def build(
        cls, vocab: int, k_mode: str, window: int, k_min: int, k_max: int | None, fixed_k: int
    ) -> TopKRule:
        check_choice("k_mode", k_mode, K_MODES)
        if k_mode == "fixed":
            if not 2 <= fixed_k <= vocab:
                raise ValueError(f"fixed_k must be in [2, vocab size {vocab}], got {fixed_k}")
            return cls(fixed_k, fixed_k, fixed_k, fixed_k)
        width = window_width(vocab, window)
        return cls(None, width, *resolve_k_bounds(width, k_min, k_max))

    def select(self, leader: Tensor) -> LedTopK:
        """Led ids of `leader [n, V]` (no grad). The top-k runs in the logits' own dtype: bf16 and
        fp16 widen to float32 exactly, so the ids are those of the upcast logits; only the
        `[n, width]` values the knee is searched on are upcast."""
        top = leader.detach().topk(self.width, dim=-1, sorted=True)
        if self.fixed_k is not None:
            return LedTopK(top.indices, torch.full_like(top.indices[:, 0], self.fixed_k))
        k = knee_k_from_sorted(top.values, self.k_min, self.k_max)
        return LedTopK(top.indices[:, : int(k.max()) if k.numel() else 0], k)


@dataclass
class DBiLDSelection:
    """Every led branch of one DBiLD term over n rows, and the teacher's values at their ids.

    The no-grad half of the loss: computed once per chunk (the teacher-led branch can be shared
    by several terms on the same teacher rows), `[n, ΣK]`.
    """

    sides: tuple[str, ...]  # "teacher" / "student", in `branches` order
    branches: tuple[LedTopK, ...]
    teacher_values: Tensor  # [n, ΣK] the teacher logits at the branches' ids side by side, float32

    @property
    def ids(self) -> Tensor:
        """[n, ΣK]: one gather for every branch, so backward scatters into one `[n, V]` gradient."""
        return torch.cat([branch.ids for branch in self.branches], dim=-1)

    def stats(self, k_min: int) -> KStats:
        k = dict(zip(self.sides, (branch.k for branch in self.branches), strict=True))
        return KStats(k.get("teacher"), k.get("student"), k_min)


def dbild_sides(directions: str) -> tuple[str, ...]:
    check_choice("directions", directions, DIRECTIONS)
    return tuple(side for side in ("teacher", "student") if directions in ("both", side))


def select_dbild(
    student_logits: Tensor,
    teacher_logits: Tensor,
    rule: TopKRule,
    sides: tuple[str, ...],
    teacher_led: LedTopK | None = None,
) -> DBiLDSelection:
    """The led branches of `[n, V]` rows (no grad): ids by `rule` from the teacher (or the given
    `teacher_led`, computed once for several terms) and from the student, and the teacher's
    values at them. Nothing of size `[n, V]` is upcast.

    Args:
        student_logits: `[n, V]` (only its top-k ids are read).
        teacher_logits: `[n, V]`.
        rule: how each branch picks its k (`TopKRule.build`).
        sides: the led branches, from `dbild_sides`.
        teacher_led: the teacher-led branch, `[n, K]` ids and `[n]` k, already selected.

    Returns:
        The branches' ids `[n, ΣK]` and the teacher's float32 values at them `[n, ΣK]`.
    """
    branches = []
    for side in sides:
        if side == "teacher":
            branches.append(teacher_led if teacher_led is not None else rule.select(teacher_logits))
        else:
            branches.append(rule.select(student_logits))
    ids = torch.cat([branch.ids for branch in branches], dim=-1)
    values = upcast(teacher_logits.detach().gather(-1, ids))
    return DBiLDSelection(sides, tuple(branches), values)


def dbild_selected(
    student_logits: Tensor,
    selection: DBiLDSelection,
    *,
    temperature: float,
    divergence: str,
    pair_algorithm: str = "cumulative",
    check_finite: bool = True,
) -> Tensor:
    """DBiLD per row from the student logits (differentiable) at the selected ids.

    Args:
        student_logits: `[n, V]`, any float dtype; gradients flow through the gathered values.
        selection: `select_dbild`'s branches for these rows (ids `[n, ΣK]`).
        temperature: τ > 0, divides both sides' values.
        divergence: `rkl` | `fkl`.
        pair_algorithm: `cumulative` | `explicit` (see `dbild_loss`).
        check_finite: raise on a non-finite row, naming the side; False returns it as is.

    Returns:
        `[n]`, float32 (float64 stays float64), computed on the gathered `[n, ΣK]` values only.
    """
    pair_kl = PAIR_KL[pair_algorithm]
    student_values = upcast(student_logits.gather(-1, selection.ids))
    teacher_values = selection.teacher_values
    dtype = torch.promote_types(student_values.dtype, teacher_values.dtype)
    widths = [branch.ids.shape[-1] for branch in selection.branches]
    s_vals = (student_values.to(dtype) / temperature).split(widths, dim=-1)
    t_vals = (teacher_values.to(dtype) / temperature).split(widths, dim=-1)
    per_row = student_values.new_zeros(student_values.shape[:1], dtype=dtype)
    for branch, s, t in zip(selection.branches, s_vals, t_vals, strict=True):
        valid = torch.arange(t.shape[-1], device=t.device) < branch.k[:, None]
        first, second = (s, t) if divergence == "rkl" else (t, s)
        per_row = per_row + pair_kl(first, second, valid)
    if check_finite:
        raise_if_non_finite(per_row, student_values, teacher_values)
    return per_row


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

    Returns:
        The loss in float32 whatever the input dtype (float64 stays float64): 0-dim for `mean`
        and `sum`, `[n]` for `none` (n = masked rows); with `return_stats`, a `DBiLDOutput`.

    Raises:
        ValueError: mismatched shapes, unknown options, NaN/inf logits (naming the side).
    """
    check_choice("k_mode", k_mode, K_MODES)
    check_choice("divergence", divergence, DIVERGENCES)
    check_choice("directions", directions, DIRECTIONS)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("pair_algorithm", pair_algorithm, PAIR_ALGORITHMS)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student, teacher = select_rows(student_logits, teacher_logits, mask)
    rule = TopKRule.build(student.shape[-1], k_mode, kneedle_window, k_min, k_max, fixed_k)
    sides = dbild_sides(directions)
    if student.shape[0] == 0:
        per_row = upcast(student.sum(-1))  # [0]; keeps the graph connected so backward() works
        stats = KStats(None, None, k_min)
    else:
        selection = select_dbild(student, teacher, rule, sides)
        per_row = dbild_selected(
            student,
            selection,
            temperature=temperature,
            divergence=divergence,
            pair_algorithm=pair_algorithm,
            check_finite=check_finite,
        )
        stats = selection.stats(k_min)
    loss = reduce_rows(per_row, reduction)
    return DBiLDOutput(loss, stats) if return_stats else loss
