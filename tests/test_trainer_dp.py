"""Data parallelism: 2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("_dp_worker.py")


def _run(tmp_path: Path, processes: int, mode: str) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{processes}-{mode}"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        str(WORKER),
        str(out),
        mode,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out / "weights.pt")


def test_two_ranks_match_one_rank_accumulating(tmp_path):
    two_ranks = _run(tmp_path, 2, "split")
    one_rank = _run(tmp_path, 1, "accumulate")
    start = _initial_weights()
    moved = False
    for name, initial in start.items():
        step_dp, step_ga = two_ranks[name] - initial, one_rank[name] - initial
        size = step_ga.abs().max().item()
        moved |= size > 1e-6
        error = (step_dp - step_ga).abs().max().item()
        assert error <= 1e-3 * size + 1e-9, f"{name}: steps differ by {error:.2e} (step {size:.2e})"
    assert moved


def _initial_weights() -> dict[str, torch.Tensor]:
    from switchkd_plugin.testing import build_hf_llava, build_tokenizer, student_spec

    return build_hf_llava(student_spec(), build_tokenizer()).state_dict()
