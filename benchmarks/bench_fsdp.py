"""The Switch-KD step's extra memory under FSDP2 on 2 CPU ranks, by chunk size and teacher depth.

    python benchmarks/bench_fsdp.py                    # both tables (CPU: a few minutes)
    python benchmarks/bench_fsdp.py --tables chunks    # or: depth
    python benchmarks/bench_fsdp.py --dtype float32    # CPUs without bf16 matmul kernels

The models and batches of `bench_step.py` (its tables (d) and (e)), on 2 gloo ranks: the student
sharded by accelerate's own FSDP2 preparation (as the Trainer's `--fsdp` does), the teacher by
Switch-KD (`--teacher_fsdp shard`), the engine called through the student's root module with
the student's lm_head gathered for the loss stage, as the trainer runs it. Each case runs in
fresh processes; every figure is a ratio to a baseline measured in the same run:

  (f) the step's extra peak memory at --lm_head_chunk_size 128, 256 and 0 (one chunk), as a
      ratio to one chunk
  (g) the step's extra peak memory at teacher depth 2 and 8, per-layer teacher checkpointing
      on and off, as a ratio to depth 2

Extra peak memory: the highest resident set size sampled during one step (forward and backward)
minus the resident set size just before it, the larger of the two ranks'. Each rank holds half
of every parameter; FSDP gathers a unit's parameters when it runs and frees them after.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing as mp
import os
import sys
from pathlib import Path

RANKS = 2
# --small (the smoke test): every case at a few tokens and a small vocabulary
SMALL = dict(vocab=1024, prompt_tokens=8, response_tokens=8, batch=1, dtype="float32")
CHUNKS, SMALL_CHUNKS = (128, 256, 0), (4, 0)


def _bench_step():
    """`bench_step.py` beside this file (its Case, models, batches and peak sampler)."""
    path = Path(__file__).with_name("bench_step.py")
    spec = importlib.util.spec_from_file_location("bench_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def sharded_step(case):
    """One rank's Switch-KD step under FSDP2 for `case` (a `bench_step.Case`), as a callable;
    the process group must be initialised."""
    import torch

    from switchkd_plugin.adapters import adapter_for
    from switchkd_plugin.config import SwitchKDArguments
    from switchkd_plugin.objective.engine import SwitchKDEngine
    from switchkd_plugin.objective.forward_swap import swapped_forward
    from switchkd_plugin.testing.fsdp import shard_as_the_trainer_does
    from switchkd_plugin.training import fsdp
    from switchkd_plugin.training.distributed import chunk_agreement
    from switchkd_plugin.training.setup import engine_options

    bench = sys.modules.get("bench_step") or _bench_step()
    tokenizer, student, teacher = bench._models(case)
    batch = bench._batch(case, tokenizer, student)
    student = shard_as_the_trainer_does(student)
    teacher = fsdp.shard_teacher(teacher)
    args = SwitchKDArguments(
        distill="switchkd",
        teacher_model_path="in-memory",
        lm_head_chunk_size=case.chunk,
        teacher_gradient_checkpointing=case.checkpointing,
    )
    s, t = adapter_for(student), adapter_for(teacher)
    engine = SwitchKDEngine(
        s, t, engine_options(args, case.vocab, run_switch=True),
        chunk_agreement(torch.device(case.device), RANKS), teacher_calls=fsdp.FSDPTeacherCalls(t),
        sharded_student_head=fsdp.gathered_student_head(s),
    )  # fmt: skip
    parameters = [p for p in student.parameters() if p.requires_grad]

    def run():
        for p in parameters:
            p.grad = None
        with swapped_forward(student, lambda b: engine(b).loss):
            student(batch).backward()

    return run


def _rank(rank: int, port: int, case, queue) -> None:
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(RANKS), LOCAL_RANK=str(rank))  # fmt: skip
    torch.distributed.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    run = sharded_step(case)
    run()  # warm-up: FSDP's lazy init, the first gathers' buffers
    bench = sys.modules["bench_step"]
    with bench._PeakSampler() as peak:
        run()
    extras = [None] * RANKS
    torch.distributed.all_gather_object(extras, peak.extra)
    if rank == 0:
        queue.put(max(extras))
    torch.distributed.destroy_process_group()


def _run(case, port: int) -> int:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read at the children's start
    context = mp.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_rank, args=(r, port, case, queue)) for r in range(RANKS)]
    for process in ranks:
        process.start()
    extra = queue.get()
    for process in ranks:
        process.join()
    return extra


def chunk_table(bench, dtype: str, port: int, small: bool) -> None:
    sizes = dict(vocab=32_768, prompt_tokens=64, response_tokens=512, dtype=dtype)
    base = bench.Case("step", repeats=0, **{**sizes, **(SMALL if small else {})})
    chunks = SMALL_CHUNKS if small else CHUNKS
    peaks = {c: _run(dataclasses.replace(base, chunk=c), port + i) for i, c in enumerate(chunks)}
    rows = base.batch * base.response_tokens
    one = bench._mib(peaks[0])
    print(f"\n(f): FSDP2, 2 ranks: step extra peak memory by --lm_head_chunk_size ({rows} "
          f"response rows, V={base.vocab}), as a ratio to one chunk (0: {one})")  # fmt: skip
    for chunk, peak in peaks.items():
        print(f"  chunk {chunk or rows:>4}: {bench._mib(peak):>10}  {peak / peaks[0]:.2f}x")


def depth_table(bench, dtype: str, port: int, small: bool) -> None:
    sizes = dict(vocab=8192, prompt_tokens=448, response_tokens=32, dtype=dtype)
    sizes.update(SMALL if small else {})
    base = bench.Case("step", teacher_widths="depth", repeats=0, **sizes)
    print(f"\n(g): FSDP2, 2 ranks: step extra peak memory, teacher hidden 1024 x depth; "
          f"B={base.batch}, {base.prompt_tokens + base.response_tokens} text tokens + image, "
          f"V={base.vocab}")  # fmt: skip
    for checkpointing in (False, True):
        peaks = {}
        for layers in (2, 8):
            case = dataclasses.replace(base, teacher_layers=layers, checkpointing=checkpointing)
            port += 1
            peaks[layers] = _run(case, port)
        print(f"  teacher checkpointing {'on ' if checkpointing else 'off'}: depth 2 "
              f"{bench._mib(peaks[2])}, depth 8 {bench._mib(peaks[8])}: "
              f"{peaks[8] / peaks[2]:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", default=["chunks", "depth"],
                        choices=["chunks", "depth"])  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--port", type=int, default=29611, help="first rendezvous port")
    parser.add_argument("--small", action="store_true", help="tiny sizes (the smoke test)")
    args = parser.parse_args()
    import torch

    bench = _bench_step()
    dtype = "float32" if args.small else args.dtype
    print(f"torch {torch.__version__}, {RANKS} gloo ranks x 1 thread, CPU, {dtype} weights")
    tables = {"chunks": chunk_table, "depth": depth_table}
    for index, table in enumerate(args.tables):
        tables[table](bench, args.dtype, args.port + 10 * index, args.small)


if __name__ == "__main__":
    main()
