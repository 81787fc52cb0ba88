"""The miniature replication: every student variant x several seeds from one cached teacher,
written as a markdown table, a CSV, and two plots (accuracy; the VSD and align terms over
training).

Each finished run is kept as JSON under the cache (keyed by the config), so an interrupted
replication resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from switchkd_plugin.demo.pipeline import (
    OVERALL,
    VARIANTS,
    Accuracy,
    DemoConfig,
    DemoContext,
    StudentRun,
    _hash,
    chance_accuracy,
    prepare,
    run_student,
    stage,
)
from switchkd_plugin.demo.shapes import QUESTION_TYPES

COLUMNS = (*QUESTION_TYPES, OVERALL)


def _cached_run(context: DemoContext, cache_dir: Path, variant: str, seed: int) -> StudentRun:
    """``run_student``, or its stored result for the same config."""
    key = _hash(
        {
            # The resolved host: "auto" may mean either.
            "config": dataclasses.asdict(
                dataclasses.replace(context.config, host=context.host.name)
            ),
            "teacher": context.config.teacher_key(context.host.name),
        }
    )
    path = cache_dir / f"runs-{key}" / f"{variant}-seed{seed}.json"
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
    runs = []
    for seed in range(seeds):
        for variant in variants:
            stage(f"student {variant}, seed {seed + 1}/{seeds}")
            runs.append(_cached_run(context, cache_dir, variant, seed))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.md").write_text(
        results_markdown(config, context.host.label, teacher, runs, seeds)
    )
    write_csv(out_dir / "results.csv", teacher, runs)
    plot_accuracy(out_dir / "accuracy.png", teacher, runs)
    plot_terms(out_dir / "vsd_over_training.png", runs)
    stage(f"wrote {out_dir}/results.md, results.csv, accuracy.png, vsd_over_training.png")
    print((out_dir / "results.md").read_text(), flush=True)
    return runs


def _by_variant(runs: Sequence[StudentRun]) -> dict[str, list[StudentRun]]:
    grouped: dict[str, list[StudentRun]] = {}
    for run in runs:
        grouped.setdefault(run.variant, []).append(run)
    return grouped


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def results_markdown(
    config: DemoConfig, host_label: str, teacher: Accuracy, runs: Sequence[StudentRun], seeds: int
) -> str:
    """The accuracy table (mean ± std over seeds, %) and the run's settings. With an ``sft``
    variant, a last column gives each variant's overall gain over it, paired by seed (the
    variants of a seed share init and data order, so the pairing removes most seed noise)."""
    grouped = _by_variant(runs)
    sft = {run.seed: run.accuracy[OVERALL] for run in grouped.get("sft", [])}
    gain = ["overall − sft, paired"] if sft else []
    header = "| model | " + " | ".join([*COLUMNS, *gain]) + " |"
    lines = [header, "|---|" + "---:|" * (len(COLUMNS) + len(gain))]
    for name, accuracy in (("teacher", teacher), ("chance", chance_accuracy())):
        cells = [f"{100 * accuracy[c]:.1f}" for c in COLUMNS] + [""] * len(gain)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for variant, group in grouped.items():
        values = [[100 * run.accuracy[column] for run in group] for column in COLUMNS]
        if sft:
            values.append([100 * (run.accuracy[OVERALL] - sft[run.seed]) for run in group])
        cells = ["{:.1f} ± {:.1f}".format(*_mean_std(column)) for column in values]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    s, t, v = config.student_schedule, config.teacher_schedule, config.vision_schedule
    start = (
        f"after a {config.student_warmup.steps}-step plain-SFT warm-up with the vision encoder "
        "frozen (one per seed, shared by its variants)"
        if config.student_warmup.steps
        else "from a random connector and LM (no warm-up)"
    )
    return (
        "# Switch-KD miniature replication\n\n"
        f"Path: {host_label}. Held-out test exact-match accuracy (%), {config.task.num_test} "
        f"questions; students: mean ± std over {seeds} seeds.\n\n" + "\n".join(lines) + "\n\n"
        f"Shared vision encoder: pretrained {v.steps} steps on per-cell shape/colour labels; "
        f"teacher and students start from it. Teacher: LM {config.teacher.hidden_size}x"
        f"{config.teacher.num_layers}, SFT {t.steps} steps, lr {t.learning_rate}, vision "
        f"frozen. Students: LM {config.student.hidden_size}x{config.student.num_layers}, "
        f"{s.steps} steps, batch {s.batch_size}, lr {s.learning_rate}, everything trained "
        f"(sft_frozen_vision: all but the vision encoder), {start}. Train split: "
        f"{config.task.num_train}.\n"
    )


def write_csv(path: Path, teacher: Accuracy, runs: Sequence[StudentRun]) -> None:
    """One row per model and seed (the teacher: seed empty), accuracies as fractions."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "seed", *COLUMNS])
        writer.writerow(["teacher", "", *(f"{teacher[c]:.4f}" for c in COLUMNS)])
        for run in runs:
            writer.writerow([run.variant, run.seed, *(f"{run.accuracy[c]:.4f}" for c in COLUMNS)])


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: works without a display
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "the replication's plots need matplotlib: pip install -e '.[demo]'"
        ) from error
    return plt


def plot_accuracy(path: Path, teacher: Accuracy, runs: Sequence[StudentRun]) -> None:
    """Grouped bars: mean accuracy per question type per variant, std as error bars; the
    teacher and chance as markers."""
    plt = _pyplot()
    grouped = _by_variant(runs)
    figure, axes = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(grouped)
    for i, (variant, group) in enumerate(grouped.items()):
        stats = [_mean_std([100 * run.accuracy[c] for run in group]) for c in COLUMNS]
        positions = [x + (i - (len(grouped) - 1) / 2) * width for x in range(len(COLUMNS))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=variant)
    for reference, style in ((teacher, "k_"), (chance_accuracy(), "r_")):
        axes.plot(range(len(COLUMNS)), [100 * reference[c] for c in COLUMNS], style, ms=40)
    axes.plot([], [], "k_", label="teacher")
    axes.plot([], [], "r_", label="chance")
    axes.set_xticks(range(len(COLUMNS)), COLUMNS)
    axes.set_ylabel("test exact match (%)")
    axes.set_ylim(0, 102)
    # Below the axes: inside, it would hide the teacher's markers near 100%.
    axes.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _term_curve(group: Sequence[StudentRun], term: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a logged term, per logging step."""
    steps = [entry["step"] for entry in group[0].log if term in entry]
    values = [
        statistics.fmean(entry[term] for run in group for entry in run.log if entry["step"] == step)
        for step in steps
    ]
    return steps, values


def plot_terms(path: Path, runs: Sequence[StudentRun]) -> None:
    """The VSD term (switchkd, vsd_only) and the align term (dbild-family variants) over
    training, mean over seeds, log scale."""
    plt = _pyplot()
    grouped = _by_variant(runs)
    figure, (vsd_axes, align_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, term in ((vsd_axes, "vsd"), (align_axes, "align")):
        for variant, group in grouped.items():
            if any(term in entry for entry in group[0].log):
                axes.plot(*_term_curve(group, term), label=variant)
        axes.set_yscale("symlog", linthresh=1e-4)
        axes.set_xlabel("training step")
        axes.set_title(f"{term} term (per response token)")
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
