"""FSDP2 on CPU ranks for tests and benchmarks: accelerate sets up FSDP on accelerator ranks only
(on CPU ranks it falls back to DDP without a word), so a test Trainer puts the plugin the
Trainer built from `--fsdp` / `--fsdp_config` back into accelerate's state. From there on the
Trainer and accelerate run their own FSDP2 path, as on GPUs: `fsdp2_prepare_model` shards the
student (`fully_shard` per decoder layer and vision block, the embeddings and the tail
[final norm, lm_head] in their own units, then the root), the optimizer is switched to the
shards, checkpoints go through `save_fsdp_model` / `load_fsdp_model`.

What differs from a GPU run: gloo instead of NCCL (the same collectives), a CPU device mesh,
no CUDA streams (FSDP2's prefetch overlaps nothing), and `--bf16` autocast on CPU.
"""

from __future__ import annotations

import transformers
from torch import nn


class FSDPOnCPU:
    """Put before a Trainer class (`fsdp_on_cpu`): FSDP as the flags ask, on CPU ranks.
    `mixed_precision_policy`: the plugin's (None: accelerate's from --bf16 / --fp16)."""

    mixed_precision_policy = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args and force_fsdp(
            self.accelerator, self.args.fsdp_plugin_args, self.mixed_precision_policy
        ):
            self.is_fsdp_enabled = True


def fsdp_on_cpu(
    base: type[transformers.Trainer], mixed_precision_policy=None
) -> type[transformers.Trainer]:
    """`base` with `FSDPOnCPU` first; `mixed_precision_policy`: a `MixedPrecisionPolicy`."""
    attributes = {"mixed_precision_policy": mixed_precision_policy}
    return type(f"FSDPOnCPU{base.__name__}", (FSDPOnCPU, base), attributes)


def force_fsdp(accelerator, plugin_args: dict, mixed_precision_policy=None) -> bool:
    """On CPU ranks, put an FSDP plugin built from `plugin_args` into `accelerator`'s state, as
    accelerate does on accelerator ranks; False (nothing done) elsewhere."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    plugin.mixed_precision_policy = mixed_precision_policy
    if state.mixed_precision != "no":  # as AcceleratorState does on accelerator ranks
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    # Every later `AcceleratorState()` copies the process state's distributed type over its
    # own: set both.
    state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    return True


def shard_as_the_trainer_does(model: nn.Module) -> nn.Module:
    """`model` sharded by accelerate's own FSDP2 preparation (`fsdp2_prepare_model`, what the
    Trainer's `--fsdp "full_shard auto_wrap" --fsdp_config '{"fsdp_version": 2}'` runs), on
    the CPU ranks of an initialised process group."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    force_fsdp(accelerator, {"fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP"})
    return accelerator.prepare(model)
