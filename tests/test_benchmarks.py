"""The benchmarks' step functions run on the current code (a renamed engine method broke the
switch pass of `bench_step.py` once, unnoticed): each kind takes one step at a small size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", BENCHMARKS / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "kind", ["sft", "student", "teacher", "switch", "step", "full", "generate"]
)
def test_bench_step_kinds_run_one_step(kind: str) -> None:
    bench = _bench_step()
    # The paper's student widths, the small depth-table teacher, a small vocabulary and batch.
    case = bench.Case(kind, teacher_widths="depth", vocab=1024, prompt_tokens=8,
                      response_tokens=8, batch=1, chunk=4, dtype="float32")  # fmt: skip
    bench.step_function(case)()


def _bench_loss_stage():
    sys.path.insert(0, str(BENCHMARKS))  # it imports bench_step's helpers
    spec = importlib.util.spec_from_file_location(
        "bench_loss_stage", BENCHMARKS / "bench_loss_stage.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["chunked", "unchunked", "floor", "trl"])
def test_bench_loss_stage_kinds_run_once(kind: str) -> None:
    if kind == "trl":
        pytest.importorskip("trl", reason="the TRL row needs trl")
    reset, run = _bench_loss_stage().loss_function(kind, chunks=3, rows=8, vocab=512)
    run()
    reset()


def test_bench_fsdp_runs_its_ratio_table_at_a_small_size() -> None:
    """`bench_fsdp.py` on 2 gloo ranks (the student sharded by accelerate, the teacher by
    Switch-KD, the engine through the root): its chunk table prints a ratio per chunk size."""
    import socket
    import subprocess

    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("FSDP2 runs through the Trainer from transformers 5 on (docs/fsdp.md)")

    with socket.socket() as probe:  # a free rendezvous port, and the next one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(BENCHMARKS / "bench_fsdp.py"), "--small", "--tables",
               "chunks", "--port", str(port)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.strip().startswith("chunk ")]
    assert len(rows) == 2 and rows[-1].endswith("1.00x"), result.stdout
