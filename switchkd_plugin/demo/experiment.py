"""The miniature replication: every student variant x several seeds from one cached teacher,
written as a markdown table (with paired gains and 95% intervals), a CSV, and two plots
(accuracy; the VSD and align terms over training).

Each finished run is kept as JSON under the cache (keyed by the config), so an interrupted
replication resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from switchkd_plugin.demo.config import DemoConfig, stable_hash
from switchkd_plugin.demo.context import DemoContext
from switchkd_plugin.demo.pipeline import prepare
from switchkd_plugin.demo.progress import stage
from switchkd_plugin.demo.report import plot_accuracy, plot_terms, results_markdown, write_csv
from switchkd_plugin.demo.students import VARIANTS, StudentRun, run_student


def _cached_run(context: DemoContext, variant: str, seed: int) -> StudentRun:
    """``run_student``, or its stored result for the same config."""
    key = stable_hash(
        {
            # The resolved host: "auto" may mean either.
            "config": dataclasses.replace(context.config, host=context.host.name).settings(),
            "teacher": context.config.teacher_key(context.host.name, context.data.content_digest),
        }
    )
    path = context.cache_dir / f"runs-{key}" / f"{variant}-seed{seed}.json"
    if path.exists():
        stage(f"{variant} seed {seed}: reusing {path}")
        return StudentRun(**json.loads(path.read_text()))
    run = run_student(context, variant, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(run)))
    return run


def replicate(
    config: DemoConfig, cache_dir: Path, out_dir: Path, seeds: int, variants: Sequence[str]
) -> list[StudentRun]:
    """Train and evaluate ``variants`` x ``seeds`` students; write ``out_dir/results.{md,csv}``,
    ``accuracy.png`` and ``vsd_over_training.png``."""
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    context = prepare(config, cache_dir)
    stage("evaluating the teacher")
    teacher = context.evaluate(context.teacher, "evaluate teacher")
    chance = context.data.chance_accuracy()
    runs = []
    for seed in range(seeds):
        for variant in variants:
            stage(f"student {variant}, seed {seed + 1}/{seeds}")
            runs.append(_cached_run(context, variant, seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(
        results_markdown(config, context.host.label, teacher, chance, runs, seeds)
    )
    write_csv(out_dir / "results.csv", teacher, runs)
    plot_accuracy(out_dir / "accuracy.png", teacher, chance, runs)
    plot_terms(out_dir / "vsd_over_training.png", runs)
    stage(f"wrote {out_dir}/results.md, results.csv, accuracy.png, vsd_over_training.png")
    print((out_dir / "results.md").read_text(), flush=True)
    return runs
