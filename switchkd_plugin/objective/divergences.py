"""The divergence D of each distillation term, built once from the arguments.

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

from switchkd_plugin.config import SwitchKDArguments
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
        """No grad: student `[n, V]` side logits, teacher `[n, V]` -> the term's led ids and the
        teacher's values there (`teacher_led`: the teacher-led branch computed by the caller)."""
        return select_dbild(student.detach(), teacher, self.rule, self.sides, teacher_led)

    def __call__(self, student: Tensor, selection: DBiLDSelection) -> tuple[Tensor, KStats]:
        """Sum over the rows (differentiable in `student [n, V]`) and the k of each branch."""
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
        return full_kl_loss(
            student,
            teacher,
            temperature=self.temperature,
            direction=self.direction,
            reduction="sum",
            check_finite=False,
        )


Divergence = DBiLDTerm | FullKLTerm


def make_divergence(kind: str, args: SwitchKDArguments, vocab: int) -> Divergence:
    """`dbild` (all DBiLD options from args), `bild` (fixed top-8, forward KL), `fkl`, `rkl`,
    for logits over `vocab` columns."""
    if kind == "dbild":
        rule = TopKRule.build(
            vocab, args.k_mode, args.kneedle_window, args.k_min, args.k_max, args.fixed_k
        )
        return DBiLDTerm(
            rule, dbild_sides(args.directions), args.divergence, args.temperature, args.k_min
        )
    if kind == "bild":
        rule = TopKRule.build(vocab, "fixed", 0, 2, None, 8)
        return DBiLDTerm(rule, dbild_sides("both"), "fkl", args.temperature, k_min=2)
    if kind in ("fkl", "rkl"):
        return FullKLTerm("forward" if kind == "fkl" else "reverse", args.temperature)
    raise ValueError(f"unknown divergence {kind!r}: choose one of 'dbild', 'bild', 'fkl', 'rkl'")
