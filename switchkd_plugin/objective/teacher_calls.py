"""How the engine calls the teacher: a frozen replica directly, a ZeRO-3 sharded one through
its root module with a gathered lm_head.

A sharded teacher (its own DeepSpeed engine, no optimizer) gathers each submodule's parameters
when the submodule is called. Two things follow:

- DeepSpeed's prefetch replays a per-step trace of those calls, which starts at the root
  module's forward pre-hook. Calling submodules directly never starts one (every gather blocks,
  and the unfinished trace grows each step), so one step's teacher passes run inside one call of
  the root module.
- The loss stage calls the teacher's lm_head twice per chunk, once without grad (the teacher's
  rows) and once under autograd inside the stage's forward (the switch rows' gradient is taken
  there, `loss_stage.py`). It uses a gathered frozen copy of the weight instead of the module:
  one gather per micro-batch, none of the module's hooks inside that autograd call. The copy is
  `[V, H_T]` in the teacher's dtype, held for the loss stage's forward (Qwen2.5-3B: 151,936 x
  2,048 bf16 = 0.62 GB per rank).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor, nn

from switchkd_plugin.adapters import VLMAdapter
from switchkd_plugin.objective.forward_swap import swapped_forward

Passes = TypeVar("Passes", bound=tuple)


class TeacherCalls:
    """A full frozen replica on each rank (no ZeRO-3, or `--teacher_zero3 replicate`)."""

    def __init__(self, adapter: VLMAdapter) -> None:
        self.adapter = adapter

    def run(self, passes: Callable[[], Passes]) -> Passes:
        """One step's teacher passes.

        Args:
            passes: runs the teacher (and switch) pathways, returning a tuple of tensors (rows
                `[n, H_T]` and masks `[n]`).
        """
        return passes()

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        """The teacher's lm_head for one step's loss stage: `[c, H_T] -> [c, V_T]`."""
        return self.adapter.lm_head


class RootTeacherCalls(TeacherCalls):
    """A sharded teacher: one step's passes run in one call of its root module, so the
    sharding's hooks on the root gather its own parameters and see the passes' outputs."""

    def run(self, passes: Callable[[], Passes]) -> Passes:
        root = self.adapter.model
        with swapped_forward(root, passes):
            return root()


class ShardedTeacherCalls(RootTeacherCalls):
    """A teacher sharded by its own ZeRO-3 engine (`--teacher_zero3 shard`). Through the root
    module's hooks its trace starts (and, after the first step, prefetches); the outputs,
    tensors only, get DeepSpeed's pre-backward gathers."""

    def lm_head(self) -> Callable[[Tensor], Tensor]:
        import deepspeed

        head = self.adapter.lm_head
        params = list(head.parameters())
        # A collective: every rank runs the loss stage of every micro-batch.
        with deepspeed.zero.GatheredParameters(params):
            weight = head.weight.detach().clone()
            bias = None if head.bias is None else head.bias.detach().clone()
        return lambda hidden: F.linear(hidden, weight, bias)


def chunk_safe_when_sharded(adapter: VLMAdapter) -> bool:
    """Whether the loss stage can use a gathered copy of the teacher's lm_head (a Linear)."""
    return isinstance(adapter.lm_head, nn.Linear)


def shard_teacher(teacher: nn.Module, deepspeed_config: dict):
    """Wrap the frozen teacher in its own DeepSpeed engine, in eval mode: each rank keeps a shard
    of every parameter.

    Args:
        teacher: the frozen teacher model (loaded partitioned under ZeRO-3).
        deepspeed_config: the student's ZeRO-3 config (its optimizer and scheduler dropped).
    """
    import deepspeed

    config = copy.deepcopy(deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
