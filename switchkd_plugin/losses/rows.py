"""Row selection, dtype and input checks shared by every distillation loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def upcast(tensor: Tensor) -> Tensor:
    """float64 stays float64; any other float dtype (bf16/fp16 from mixed precision) -> float32."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(
            f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}"
        )


def select_rows(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Flatten `[..., V]` logits to the `[n, V]` rows where `mask` is True, in their own dtype.

    The teacher rows are detached: no gradient ever reaches the teacher logits.
    """
    if student_logits.shape != teacher_logits.shape:
        what = (
            "vocabulary sizes differ"
            if student_logits.shape[:-1] == teacher_logits.shape[:-1]
            else "shapes differ"
        )
        raise ValueError(
            f"student and teacher logits must have the same shape, {what}: "
            f"student {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(
            f"logits need a vocabulary axis of size >= 2, got {tuple(student_logits.shape)}"
        )
    vocab = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} must equal the logits' row shape "
                f"{tuple(student_logits.shape[:-1])}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor, got {mask.dtype}")
        rows = mask.reshape(-1)
        student, teacher = student[rows], teacher[rows]
    return student, teacher


def upcast_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Both sides in the loss dtype: float32, or float64 when either side is float64."""
    dtype = torch.promote_types(upcast(student[:0]).dtype, upcast(teacher[:0]).dtype)
    return student.to(dtype), teacher.to(dtype)


def raise_if_non_finite(per_row: Tensor, student: Tensor, teacher: Tensor) -> None:
    """Turn a non-finite loss into an error that names the side whose logits caused it.

    Checking the `[n]` result costs one small reduction; the `[n, V]` scan runs only on failure.
    """
    if bool(torch.isfinite(per_row).all()):
        return
    bad = [
        name
        for name, logits in (("student", student), ("teacher", teacher))
        if not bool(torch.isfinite(logits).all())
    ]
    cause = (
        f"NaN/inf in the {' and '.join(bad)} logits"
        if bad
        else "the logits are finite but the loss overflowed (extreme logits for this temperature?)"
    )
    raise ValueError(
        f"non-finite distillation loss: {cause}; check the model outputs "
        "(a diverged run, fp16 overflow, or -inf masking of vocabulary entries)"
    )


def reduce_rows(per_row: Tensor, reduction: str) -> Tensor:
    """`mean` over rows (an empty set of rows gives 0, not NaN), `sum`, or `none` (`[n]`)."""
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / max(per_row.numel(), 1) if reduction == "mean" else total
