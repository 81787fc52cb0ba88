"""One rank of the data-parallel normaliser test (run by tests/test_trainer_dp.py via torchrun).

Every rank builds the same tiny student and teacher, takes its share of two micro-batches with
different response-token counts, and trains one SGD step; rank 0 saves the weights.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from switchkd_plugin.testing import (
    build_hf_llava,
    build_tokenizer,
    make_host_batch,
    student_spec,
    teacher_spec,
)

sys.path.insert(0, os.path.dirname(__file__))
from test_trainer import _split, _trainer


def _models_and_batch():
    """Tokenizer, student, teacher and a 4-sample batch: transformers' LLaVA, or the family
    named by SWITCHKD_DP_FAMILY (``switchkd_plugin.testing.families``; one with per-sample
    image tensors, so that the batch splits by rows)."""
    family = os.environ.get("SWITCHKD_DP_FAMILY")
    if not family:
        tokenizer = build_tokenizer()
        student = build_hf_llava(student_spec(), tokenizer)
        teacher = build_hf_llava(teacher_spec(), tokenizer)
        return tokenizer, student, teacher, make_host_batch(student, tokenizer, n=4, seed=7)
    from switchkd_plugin.testing.families import (
        build_family_model,
        build_family_tokenizer,
        make_family_batch,
    )

    tokenizer = build_family_tokenizer(family)
    shared_vision = student_spec(vision_layers=teacher_spec().vision_layers)
    student = build_family_model(family, shared_vision, tokenizer)
    teacher = build_family_model(family, teacher_spec(), tokenizer)
    return tokenizer, student, teacher, make_family_batch(family, student, tokenizer, n=4, seed=7)


def main(out_dir: str, world_micro_batches: str, deepspeed: str | None = None) -> None:
    tokenizer, student, teacher, batch = _models_and_batch()
    student.train()
    teacher.requires_grad_(False).eval()
    micro = _split(batch, (1, 3))
    if world_micro_batches == "split-empty":  # one rank's micro-batch has no response token
        micro[0]["labels"] = torch.full_like(micro[0]["labels"], -100)
    accumulation = 2 if world_micro_batches == "accumulate" else 1
    on_gpu = os.environ.get("SWITCHKD_DEVICE") == "cuda"  # benchmarks/gpu_check.py
    training = {
        "gradient_accumulation_steps": accumulation,
        "ddp_backend": "nccl" if on_gpu else "gloo",
        "use_cpu": not on_gpu,
    }
    if deepspeed:
        training["deepspeed"] = deepspeed
    # Small lm_head chunks: the checkpointed (recomputed-in-backward) path runs under every layout.
    trainer = _trainer(student, tokenizer, micro, out_dir, teacher=teacher, training=training,
                       lm_head_chunk_size=16)  # fmt: skip
    assert trainer.is_deepspeed_enabled == bool(deepspeed)
    trainer.train()
    trainer.save_model(out_dir)  # gathers ZeRO-3 shards on rank 0
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Interpreter teardown with DeepSpeed engines and gloo threads alive can abort ("terminate
    # called without an active exception", seen once in ~10 CPU runs) after all the work is
    # done and saved: leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
