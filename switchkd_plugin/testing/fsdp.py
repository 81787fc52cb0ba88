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


class FSDPOnCPU:
    """Put before a Trainer class (`fsdp_on_cpu`): FSDP as the flags ask, on CPU ranks.
    `mixed_precision_policy`: the plugin's (None: accelerate's from --bf16 / --fp16)."""

    mixed_precision_policy = None

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = self.accelerator.state
        if state.distributed_type != DistributedType.MULTI_CPU or not self.args.fsdp_plugin_args:
            return
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        plugin.mixed_precision_policy = self.mixed_precision_policy
        if state.mixed_precision != "no":  # as AcceleratorState does on accelerator ranks
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # Every later `AcceleratorState()` copies the process state's distributed type over its
        # own: set both.
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True


def fsdp_on_cpu(
    base: type[transformers.Trainer], mixed_precision_policy=None
) -> type[transformers.Trainer]:
    """`base` with `FSDPOnCPU` first; `mixed_precision_policy`: a `MixedPrecisionPolicy`."""
    attributes = {"mixed_precision_policy": mixed_precision_policy}
    return type(f"FSDPOnCPU{base.__name__}", (FSDPOnCPU, base), attributes)
