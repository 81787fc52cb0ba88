"""The shared tensor assertion: derived tolerance, worst element in the message."""

from __future__ import annotations

import pytest
import torch

from switchkd_plugin.testing.tensor_close import assert_close


def test_summation_order_noise_passes_and_a_real_difference_names_the_worst_element():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(64, 4096, generator=gen)
    # Same sums in another order: float32 rounding only, well inside eps * sqrt(K) * scale.
    forward, blocked = values.sum(1), values.view(64, 64, 64).sum(2).sum(1)
    assert not torch.equal(forward, blocked)
    summands = float(values.abs().max())
    assert_close(blocked, forward, terms=4096, scale=summands)
    wrong = forward.clone()
    wrong[17] += 1e-2  # 20x the tolerance
    with pytest.raises(AssertionError) as error:
        assert_close(wrong.view(8, 8), forward.view(8, 8), terms=4096, scale=summands, name="sums")
    text = str(error.value)
    assert text.startswith("sums: 1 of 64 elements differ by more than")
    assert "worst at index (2, 1)" in text and f"expected {forward[17].item():.9g}" in text


def test_non_finite_values_must_match_exactly():
    expected = torch.tensor([1.0, float("nan"), float("inf")])
    assert_close(expected.clone(), expected)
    for broken in ([1.0, 0.0, float("inf")], [1.0, float("nan"), 3.0]):
        with pytest.raises(AssertionError, match="worst at index"):
            assert_close(torch.tensor(broken), expected)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close(expected.double(), expected)
