"""Activation checkpointing of each decoder layer of a frozen model, from outside it.

The teacher is in eval mode, where transformers' `gradient_checkpointing_enable` does nothing,
and checkpointing its whole decoder at once brings every layer's activations back together in
backward. Per layer, the switch pass keeps one boundary tensor per layer and recomputes one
layer's activations at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from switchkd_plugin.objective.forward_swap import swapped_forward


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


@contextmanager
def checkpoint_each_layer(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, every call of a layer in `layers` saves only its inputs for backward
    and recomputes its forward there. Each layer's `forward` attribute is restored exactly on
    exit. Module hooks stay on `__call__`, outside the checkpoint: ZeRO-3 still gathers each
    submodule's parameters when the recompute calls it."""
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(swapped_forward(layer, partial(_checkpointed, layer.forward)))
        yield
