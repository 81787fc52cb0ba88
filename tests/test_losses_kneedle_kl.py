"""Kneedle k against a plain-Python transcription of the rule; full-vocab KL against its sum."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from switchkd_plugin.losses import full_kl_loss, kneedle_k


def _kneedle_by_hand(row: list[float], window: int, k_min: int, k_max: int | None) -> int:
    """docs/method.md read literally, one row, no tensors."""
    values = sorted(row, reverse=True)
    n = len(values) if window <= 0 else min(window, len(values))
    values = values[:n]
    top, bottom = values[0], values[-1]
    upper = n if k_max is None else min(k_max, n)
    if top == bottom:
        return k_min
    d = [(1 - i / (n - 1)) - (v - bottom) / (top - bottom) for i, v in enumerate(values)]
    knee = d.index(max(d))
    return max(k_min, min(knee + 1, upper))


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(-6, 6).map(lambda v: v / 2), min_size=12, max_size=12),
        min_size=1,
        max_size=6,
    ),
    window=st.sampled_from([2, 3, 5, 12, 0, -3, 50]),
    k_min=st.integers(2, 3),
    k_max=st.sampled_from([None, 3, 4, 8]),
)
def test_kneedle_matches_hand_rule_with_ties_and_flat_rows(rows, window, k_min, k_max):
    """Few distinct values: ties, flat windows and repeated maxima of d happen often."""
    width = 12 if window <= 0 else min(window, 12)
    if k_min > min(k_max or width, width):
        with pytest.raises(ValueError, match="k_min"):
            kneedle_k(
                torch.tensor(rows, dtype=torch.float64), window=window, k_min=k_min, k_max=k_max
            )
        return
    k = kneedle_k(torch.tensor(rows, dtype=torch.float64), window=window, k_min=k_min, k_max=k_max)
    expected = [_kneedle_by_hand(row, window, k_min, k_max) for row in rows]
    assert k.tolist() == expected


def test_kneedle_ignores_temperature_and_shift_and_keeps_batch_shape():
    logits = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(0)) ** 3
    k = kneedle_k(logits)
    assert k.shape == (2, 3) and k.dtype == torch.int64
    assert torch.equal(kneedle_k(logits / 3.0 + 7.0), k)
    by_hand = [_kneedle_by_hand(r.tolist(), 256, 2, None) for r in logits.reshape(6, 500).double()]
    assert k.reshape(-1).tolist() == by_hand


def _kl_by_sum(student, teacher, temperature, direction):
    log_s = torch.log_softmax(student / temperature, -1)
    log_t = torch.log_softmax(teacher / temperature, -1)
    p, log_p, log_q = (
        (log_t.exp(), log_t, log_s) if direction == "forward" else (log_s.exp(), log_s, log_t)
    )
    return (p * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_full_kl_matches_definition_with_mask(direction, temperature):
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(3, 4, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, 30, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 4, generator=gen) < 0.5
    loss = full_kl_loss(student, teacher, mask, temperature=temperature, direction=direction)
    expected = _kl_by_sum(student[mask], teacher[mask].detach(), temperature, direction).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    loss.backward()
    assert teacher.grad is None and student.grad[~mask].abs().max() == 0
    assert full_kl_loss(student, student.detach()).item() == pytest.approx(0, abs=1e-15)


def test_full_kl_bf16_gives_float32_answer():
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(5, 64, generator=gen).bfloat16()
    teacher = torch.randn(5, 64, generator=gen).bfloat16()
    loss = full_kl_loss(student, teacher)
    assert loss.dtype == torch.float32
    assert loss.item() == full_kl_loss(student.float(), teacher.float()).item()
