"""`swapped_forward`: run a module's hooks around another computation.

Calling `module(...)` with its `forward` swapped runs the module's hooks (DDP's and DeepSpeed's
bookkeeping, ZeRO-3's parameter gathers, a checkpoint wrapper) around what we compute instead:
the engine through the student's wrapper, a sharded teacher's passes through its root module,
each decoder layer under activation checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

_NO_INSTANCE_FORWARD = object()


@contextmanager
def swapped_forward(module: nn.Module, forward: Callable) -> Iterator[None]:
    """`module.forward = forward` within the block; on exit the attribute is exactly what it was
    (the class's forward, or an instance-level one a wrapper installed, e.g. accelerate's).

    Args:
        module: the module whose `__call__` (hooks included) should run `forward`.
        forward: what `module(...)` computes within the block, called with its arguments.
    """
    previous = module.__dict__.get("forward", _NO_INSTANCE_FORWARD)
    module.forward = forward
    try:
        yield
    finally:
        if previous is _NO_INSTANCE_FORWARD:
            del module.forward
        else:
            module.forward = previous
