"""Speed and peak memory of DBiLD against full-vocabulary KL, measured in the same run.

    python benchmarks/bench_dbild.py                 # V = 151,936; N = 256, 1024 on CPU
    python benchmarks/bench_dbild.py --rows 4096     # any row counts (GPU: default 1024 4096 16384)

Each case runs in a fresh process: forward + backward of the loss w.r.t. the student logits, one
warm-up, then the median of `--repeats` timings; peak memory is the process's high-water mark
above what it held once the inputs existed (CPU: max RSS; CUDA: max allocated). Every figure is
printed as a ratio to case (f), full-vocabulary forward KL, measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

from switchkd_plugin.losses import dbild_loss, full_kl_loss, pair_kl_cumulative, pair_kl_explicit

CASES = {
    "a": ("fast DBiLD, kneedle window 256", dict(kneedle_window=256)),
    "b": (
        "explicit pairs, kneedle window 256",
        dict(kneedle_window=256, pair_algorithm="explicit"),
    ),
    "c": ("fast DBiLD, fixed_k=256", dict(k_mode="fixed", fixed_k=256)),
    "d": (
        "explicit pairs, fixed_k=256",
        dict(k_mode="fixed", fixed_k=256, pair_algorithm="explicit"),
    ),
    "e": ("fast DBiLD, kneedle whole vocabulary", dict(kneedle_window=0)),
    "f": ("full-vocab forward KL (baseline)", None),
}


def _loss(case: str, student: torch.Tensor, teacher: torch.Tensor):
    options = CASES[case][1]
    if options is None:
        return full_kl_loss(student, teacher, direction="forward"), None
    out = dbild_loss(student, teacher, return_stats=True, **options)
    return out.loss, out.stats


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _measure(case: str, rows: int, vocab: int, repeats: int, device: str, queue) -> None:
    """One case in its own process, so its peak memory is its own."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    # In-place ops only: a freed temporary would raise the CPU high-water mark before we measure.
    teacher = torch.randn(rows, vocab, generator=gen, device=device).mul_(2)
    student = torch.randn(rows, vocab, generator=gen, device=device).add_(teacher).requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else _peak_bytes(device)
    times, mean_k = [], float("nan")
    for step in range(repeats + 1):
        student.grad = None
        start = time.perf_counter()
        loss, stats = _loss(case, student, teacher)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:  # the first run is the warm-up
            times.append(time.perf_counter() - start)
        if stats is not None:
            mean_k = stats.summary()["k_teacher_mean"]
    queue.put((statistics.median(times), _peak_bytes(device) - held, mean_k))


def _pairs_only(rows: int, k: int, repeats: int, device: str) -> dict[str, float]:
    """Median fwd+bwd seconds of the pair divergence alone on `[rows, k]` led values."""
    gen = torch.Generator(device=device).manual_seed(1)
    teacher = torch.randn(rows, k, generator=gen, device=device)
    student = torch.randn(rows, k, generator=gen, device=device).requires_grad_()
    valid = torch.ones(rows, k, dtype=torch.bool, device=device)
    out = {}
    for name, pair_kl in (("cumulative", pair_kl_cumulative), ("explicit", pair_kl_explicit)):
        times = []
        for step in range(repeats + 1):
            start = time.perf_counter()
            pair_kl(student, teacher, valid).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
        out[name] = statistics.median(times)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936, help="vocabulary size V")
    parser.add_argument("--rows", type=int, nargs="+", help="row counts N (default: by device)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after one warm-up")
    parser.add_argument("--cases", default="abcdef", help="which cases to run (subset of abcdef)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if "f" not in args.cases:
        parser.error("case f is the baseline every ratio is taken against: keep it in --cases")
    rows_list = args.rows or ([1024, 4096, 16384] if args.device == "cuda" else [256, 1024])
    ctx = mp.get_context("spawn")
    print(f"device={args.device} V={args.vocab} repeats={args.repeats} torch={torch.__version__}")
    for rows in rows_list:
        results = {}
        for case in args.cases:
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_measure, args=(case, rows, args.vocab, args.repeats, args.device, queue)
            )
            proc.start()
            results[case] = queue.get()
            proc.join()
        base_time, base_mem, _ = results["f"]
        print(
            f"\nN={rows}: time and peak memory as ratios to (f) ({base_time * 1e3:.0f} ms, "
            f"{base_mem / 2**20:.0f} MiB)"
        )
        print(f"{'case':<46} {'time':>8} {'memory':>8} {'mean k':>8}")
        for case, (seconds, peak, mean_k) in results.items():
            label = f"({case}) {CASES[case][0]}"
            k = "" if mean_k != mean_k else f"{mean_k:.1f}"
            print(f"{label:<46} {seconds / base_time:>7.3f}x {peak / base_mem:>7.3f}x {k:>8}")
        if "c" in results and "d" in results:
            print(
                f"(d) / (c) time: {results['d'][0] / results['c'][0]:.1f}x "
                "(explicit pairs vs cumulative at k=256, top-k selection included)"
            )
        pairs = _pairs_only(rows, 256, args.repeats, args.device)
        print(
            "pairs alone at k=256 (no top-k, no [N, V] gradient): explicit / cumulative = "
            f"{pairs['explicit'] / pairs['cumulative']:.1f}x"
        )


if __name__ == "__main__":
    main()
