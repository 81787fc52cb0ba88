"""The divergence D of each distillation term, built once from explicit options.

A DBiLD-family term splits into a no-grad selection (led top-k ids and the teacher's values
there, `[n, ΣK]`) and a differentiable loss on the student side's values at those ids, so the
engine can compute the selection once per chunk and share the teacher-led branch between terms.
A full-vocabulary KL term needs both `[n, V]` sides.
A non-finite sum is returned, not raised: the trainer checks every term and decides on all
data-parallel ranks alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from switchkd_plugin.losses import KStats, full_kl_loss
from switchkd_plugin.losses.dbild import (
    DBiLDSelection,
    LedTopK,
    TopKRule,
    dbild_selected,
    dbild_sides,
    select_dbild,
)


@dataclass(frozen=True)
class DBiLDTerm:
    """DBiLD (and BiLD) as a sum over rows, in two steps."""

    rule: TopKRule
    sides: tuple[str, ...]
    divergence: str
    temperature: float
    k_min: int

    @property
    def teacher_led(self) -> bool:
        return "teacher" in self.sides

    def select(
        self, student: Tensor, teacher: Tensor, teacher_led: LedTopK | None = None
    ) -> DBiLDSelection:
        """The term's led top-k ids and the teacher's values there (no grad).

        Args:
            student: `[n, V]` logits of the student side (the student's, or the switch pass's).
            teacher: `[n, V]` logits of the teacher.
            teacher_led: the teacher-led branch (`[n, K]` ids, `[n]` k) when the caller
                computed it once for both terms; None: computed here.

        Returns the selection: led ids and the teacher's values there, `[n, ΣK]`.
        """
        return select_dbild(student.detach(), teacher, self.rule, self.sides, teacher_led)

    def __call__(self, student: Tensor, selection: DBiLDSelection) -> tuple[Tensor, KStats]:
        """The divergence summed over the rows, and the k of each branch.

        Args:
            student: `[n, V]` logits of the student side, differentiable.
            selection: `select(student, teacher)` of the same rows.

        Returns the 0-dim sum (not checked for NaN/inf: the trainer checks every term) and
        the k statistics (`[n]` per branch).
        """
        per_row = dbild_selected(
            student,
            selection,
            temperature=self.temperature,
            divergence=self.divergence,
            check_finite=False,
        )
        return per_row.sum(), selection.stats(self.k_min)


@dataclass(frozen=True)
class FullKLTerm:
    """Full-vocabulary KL (the fkl / rkl ablations) as a sum over rows."""

    direction: str
    temperature: float

    def __call__(self, student: Tensor, teacher: Tensor) -> Tensor:
        """The KL of `student` `[n, V]` (differentiable) and `teacher` `[n, V]` logits, summed
        over the rows (0-dim; not checked for NaN/inf)."""
        return full_kl_loss(
            student,
            teacher,
            temperature=self.temperature,
            direction=self.direction,
            reduction="sum",
            check_finite=False,
        )


Divergence = DBiLDTerm | FullKLTerm


@dataclass(frozen=True)
class DBiLDSpec:
    """DBiLD's options, named as their command-line flags (`--k_mode` ...; `config.py` says what
    each means)."""

    k_mode: str  # "kneedle" (a k per row and side) or "fixed"
    kneedle_window: int
    k_min: int
    k_max: int | None
    fixed_k: int
    directions: str  # "both", "teacher" or "student"
    divergence: str  # "rkl" or "fkl"


def make_divergence(kind: str, vocab: int, temperature: float, dbild: DBiLDSpec) -> Divergence:
    """The divergence of one distillation term.

    Args:
        kind: `dbild` (the options of `dbild`), `bild` (fixed top-8, forward KL, both
            directions), `fkl` / `rkl` (full-vocabulary forward / reverse KL).
        vocab: logits columns the term compares (`[n, vocab]` on both sides).
        temperature: both sides' logits are divided by it.
        dbild: DBiLD's options, used by `kind="dbild"` only.
    """
    if kind == "dbild":
        d = dbild
        rule = TopKRule.build(vocab, d.k_mode, d.kneedle_window, d.k_min, d.k_max, d.fixed_k)
        return DBiLDTerm(rule, dbild_sides(d.directions), d.divergence, temperature, d.k_min)
    if kind == "bild":
        rule = TopKRule.build(vocab, "fixed", 0, 2, None, 8)
        return DBiLDTerm(rule, dbild_sides("both"), "fkl", temperature, k_min=2)
    if kind in ("fkl", "rkl"):
        return FullKLTerm("forward" if kind == "fkl" else "reverse", temperature)
    raise ValueError(f"unknown divergence {kind!r}: choose one of 'dbild', 'bild', 'fkl', 'rkl'")
