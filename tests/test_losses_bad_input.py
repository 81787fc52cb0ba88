"""Bad input to the losses fails early with an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from switchkd_plugin.losses import dbild_loss, full_kl_loss, kneedle_k

LOSSES = [dbild_loss, full_kl_loss]


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_vocab_mismatch_names_both_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"vocabulary sizes differ.*\(4, 151936\).*\(4, 152064\)"):
        loss_fn(torch.randn(4, 151936), torch.randn(4, 152064))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_shape_mismatch_names_both_shapes(loss_fn):
    with pytest.raises(ValueError, match=r"shapes differ.*\(2, 3, 10\).*\(2, 4, 10\)"):
        loss_fn(torch.randn(2, 3, 10), torch.randn(2, 4, 10))


@pytest.mark.parametrize("loss_fn", LOSSES)
def test_bad_mask(loss_fn):
    with pytest.raises(ValueError, match=r"mask shape \(3,\) must equal.*\(2, 3\)"):
        loss_fn(torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        loss_fn(torch.randn(2, 3, 10), torch.randn(2, 3, 10), torch.ones(2, 3))


@pytest.mark.parametrize("loss_fn", LOSSES)
@pytest.mark.parametrize(
    ("side", "value"),
    [("student", float("nan")), ("teacher", float("inf")), ("both", float("nan"))],
)
def test_non_finite_logits_name_the_side(loss_fn, side, value):
    student, teacher = torch.randn(4, 50), torch.randn(4, 50)
    if side in ("student", "both"):
        student[1, 3] = value
    if side in ("teacher", "both"):
        teacher[2, 7] = value
    expected = "student and teacher" if side == "both" else side
    with pytest.raises(ValueError, match=f"NaN/inf in the {expected} logits"):
        loss_fn(student, teacher)
    # The trainer checks every term itself (identically on all ranks): returned, not raised.
    assert not torch.isfinite(loss_fn(student, teacher, check_finite=False))


@pytest.mark.parametrize(
    ("option", "value", "valid"),
    [
        ("k_mode", "dynamic", "'kneedle', 'fixed'"),
        ("divergence", "js", "'rkl', 'fkl'"),
        ("directions", "forward", "'both', 'teacher', 'student'"),
        ("reduction", "avg", "'mean', 'sum', 'none'"),
        ("pair_algorithm", "naive", "'cumulative', 'explicit'"),
    ],
)
def test_unknown_options_list_the_valid_ones(option, value, valid):
    with pytest.raises(ValueError, match=f"{option}='{value}' is not valid; choose one of {valid}"):
        dbild_loss(torch.randn(2, 10), torch.randn(2, 10), **{option: value})


def test_unknown_kl_direction_and_bad_numbers():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="direction='both' is not valid"):
        full_kl_loss(x, x, direction="both")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dbild_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError, match=r"fixed_k must be in \[2, vocab size 10\]"):
        dbild_loss(x, x, k_mode="fixed", fixed_k=11)
    with pytest.raises(ValueError, match="k_min must be >= 2"):
        dbild_loss(x, x, k_min=1)
    with pytest.raises(ValueError, match="kneedle_window=1"):
        kneedle_k(x, window=1)
    with pytest.raises(ValueError, match=r"k_min=5 exceeds .*k_max=4"):
        dbild_loss(x, x, k_min=5, k_max=4)
