"""BackwardRouter on a real accelerate Accelerator: gradients are those of the registered loss."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from switchkd_plugin.testing.tensor_close import assert_close
from switchkd_plugin.training.loss_scale import BackwardRouter, backward_divisor


@pytest.mark.parametrize("steps", [1, 3])
def test_registered_loss_gets_its_own_gradient_whatever_accelerate_divides(steps):
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=steps)
    assert backward_divisor(accelerator, {}) == steps
    router = BackwardRouter(accelerator)
    weight = torch.ones(3, requires_grad=True)
    loss = (weight * torch.tensor([1.0, 2.0, 4.0])).sum()
    router.expect(loss)
    accelerator.backward(loss / 7)  # what a Trainer hands on for its report does not matter
    assert_close(weight.grad, torch.tensor([1.0, 2.0, 4.0]), terms=2, name="gradient")


def test_a_loss_that_is_not_registered_passes_through():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    BackwardRouter(accelerator)
    weight = torch.ones(2, requires_grad=True)
    accelerator.backward(weight.sum())
    assert_close(weight.grad, torch.full((2,), 0.5), slack=0, name="gradient")  # exact: 1/2


def test_a_registered_loss_that_never_reaches_backward_is_an_error():
    router = BackwardRouter(Accelerator(cpu=True))
    router.expect(torch.ones((), requires_grad=True))
    with pytest.raises(RuntimeError, match="without accelerator"):
        router.check_consumed()
    router.check_consumed()  # reported once, then cleared
