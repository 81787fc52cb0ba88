"""The loss stage alone: time and memory against the chunk count at fixed rows, same run.

    python benchmarks/bench_loss_stage.py                 # 512 and 2,048 rows (CPU: ~10 min)
    python benchmarks/bench_loss_stage.py --rows 512 --chunks 1 2 4 8 16

What runs: the align term at the paper's shapes (student rows `[n, 896]`, teacher rows
`[n, 2048]`, V = 151,936, float32), forward and backward into the student's rows and lm_head
weight (the teacher's rows and head are frozen), three ways:

  - `chunked_loss` (this package's loss stage) with `dbild_loss` per chunk, at each chunk count;
  - unchunked response-row logits: `[n, V]` logits of both heads, `dbild_loss`, plain autograd
    (the baseline every ratio is taken against);
  - the floor of each chunk count: only the products with the heads every chunk must make
    (both heads' logits, the rows' gradient, the head-gradient update), no loss;
  - TRL's `_chunked_divergence_loss` (its `DistillationTrainer`'s loss: beta 1, T 3), when trl
    is installed: another project's chunked fused-linear loss on the same rows.

Each case runs in a fresh process: one warm-up, then the median of `--repeats` timed runs; the
last run's peak resident set size above the one just before it (inputs and heads allocated, no
gradients) is its extra memory. Large allocations are served by mmap (MALLOC_MMAP_THRESHOLD_),
so freed tensors leave the resident set and it tracks live tensors.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import QWEN_VOCAB, _mib, _PeakSampler

H_STUDENT, H_TEACHER = 896, 2048
TEMPERATURE = 3.0
DEFAULT_CHUNK_SIZE = 1024  # --lm_head_chunk_size


def _inputs(rows: int, vocab: int):
    import torch

    torch.manual_seed(0)
    student_rows = torch.randn(rows, H_STUDENT).requires_grad_()
    teacher_rows = torch.randn(rows, H_TEACHER)
    student_head = (torch.randn(vocab, H_STUDENT) * H_STUDENT**-0.5).requires_grad_()
    teacher_head = torch.randn(vocab, H_TEACHER) * H_TEACHER**-0.5
    return student_rows, teacher_rows, student_head, teacher_head


def loss_function(kind: str, chunks: int, rows: int, vocab: int):
    """(reset, run): `run` is one forward + backward of `kind` (chunked | unchunked | floor |
    trl);
    `reset` frees the gradients of the previous one."""
    import torch
    from torch import nn

    from switchkd_plugin.losses import dbild_loss
    from switchkd_plugin.objective.loss_stage import chunked_loss

    student_rows, teacher_rows, weight, teacher_weight = _inputs(rows, vocab)
    head = nn.Linear(H_STUDENT, vocab, bias=False)
    head.weight = nn.Parameter(weight.detach())

    def align(student_logits, teacher_rows_part):
        with torch.no_grad():
            teacher_logits = teacher_rows_part @ teacher_weight.T
        return dbild_loss(student_logits, teacher_logits, temperature=TEMPERATURE, reduction="sum")

    def chunked():
        size = -(-rows // chunks)

        def chunk_terms(student_logits, _switch, part):
            return align(student_logits, teacher_rows[part]), None

        loss, _ = chunked_loss(chunk_terms, chunks, size, student_rows, None, head)
        loss.backward()

    def unchunked():
        align(head(student_rows), teacher_rows).backward()

    def floor():
        # Only what every chunk must do with the heads: its logits of both heads, the rows'
        # gradient and the head-gradient update, with the logits standing in for their
        # gradient (no loss).
        size = -(-rows // chunks)
        weight_grad = torch.zeros_like(weight)
        with torch.no_grad():
            for start in range(0, rows, size):
                part = student_rows[start : start + size]
                logits = part @ weight.T
                teacher_rows[start : start + size] @ teacher_weight.T
                logits @ weight
                weight_grad.addmm_(logits.T, part)

    def trl():
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        loss, *_ = _chunked_divergence_loss(
            student_rows[None], teacher_rows[None], head.weight, teacher_weight,
            torch.ones(1, rows, dtype=torch.long), beta=1.0, temperature=TEMPERATURE,
        )  # fmt: skip
        loss.backward()

    def reset():  # outside the measured block: the previous run's gradients
        student_rows.grad = head.weight.grad = None

    kinds = {"chunked": chunked, "unchunked": unchunked, "floor": floor, "trl": trl}
    return reset, kinds[kind]


def _measure(kind: str, chunks: int, rows: int, vocab: int, repeats: int, queue) -> None:
    import torch

    torch.manual_seed(0)
    reset, run = loss_function(kind, chunks, rows, vocab)
    times = []
    for repeat in range(repeats + 1):
        reset()
        start = time.perf_counter()
        if repeat == repeats:  # the last run: memory (the previous run's gradients freed)
            sampler = _PeakSampler()
            with sampler:
                run()
        else:
            run()
        if repeat:
            times.append(time.perf_counter() - start)
    queue.put((statistics.median(times) if times else float("nan"), sampler.extra))


def _run(kind: str, chunks: int, rows: int, vocab: int, repeats: int) -> tuple[float, int]:
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # read at the child's start
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_measure, args=(kind, chunks, rows, vocab, repeats, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def table(rows: int, chunk_counts: list[int], vocab: int, repeats: int) -> None:
    base_time, base_memory = _run("unchunked", 1, rows, vocab, repeats)
    print(
        f"\n{rows} rows, V={vocab}, align term (DBiLD, T {TEMPERATURE}), fwd+bwd into the rows and "
        f"the student's head; ratios to unchunked rows ({base_time:.2f} s, "
        f"{_mib(base_memory)} extra)"
    )
    print(f"  {'case':<38} {'time':>8} {'extra peak':>12} {'time':>7} {'memory':>7}")

    def line(label: str, seconds: float, extra: int) -> None:
        print(f"  {label:<38} {seconds:7.2f}s {_mib(extra):>12} {seconds / base_time:6.2f}x "
              f"{extra / base_memory:6.2f}x")  # fmt: skip

    line("unchunked response rows", base_time, base_memory)
    default = -(-rows // DEFAULT_CHUNK_SIZE)
    for chunks in sorted({*chunk_counts, default}):
        label = f"chunked_loss, {chunks} x {-(-rows // chunks)} rows"
        label += " (default)" if chunks == default else ""
        line(label, *_run("chunked", chunks, rows, vocab, repeats))
        line("  its head products only", *_run("floor", chunks, rows, vocab, repeats))
    try:
        import trl  # noqa: F401
    except ImportError:
        print("  (trl not installed: no TRL row)")
        return
    line("TRL _chunked_divergence_loss", *_run("trl", 1, rows, vocab, repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32")
    for rows in args.rows:
        table(rows, args.chunks, args.vocab, args.repeats)


if __name__ == "__main__":
    main()
