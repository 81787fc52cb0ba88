"""The demo's reports: accuracy tables, paired gains with 95% intervals, the CSV and the plots."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from switchkd_plugin.demo.config import DemoConfig
from switchkd_plugin.demo.evaluation import OVERALL, Accuracy
from switchkd_plugin.demo.students import StudentRun

# The variants every other one is compared with, paired by seed.
BASELINES = ("sft", "sft_frozen_vision")


def accuracy_table(rows: dict[str, Accuracy], title: str = "model") -> str:
    """A markdown table, one row per model: accuracy (%) per question type and overall (the
    columns of the first row)."""
    columns = list(next(iter(rows.values())))
    lines = [
        f"| {title} | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, accuracy in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * accuracy[c]:.1f}" for c in columns) + " |"
        )
    return "\n".join(lines)


def _student_t_density(t: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))


def _student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom, by Simpson's rule on the density
    over [0, |x|] (2000 intervals: the error is far below the digits an interval needs)."""
    n, upper = 2000, abs(x)
    h = upper / n
    total = _student_t_density(0.0, df) + _student_t_density(upper, df)
    total += sum((4 if i % 2 else 2) * _student_t_density(i * h, df) for i in range(1, n))
    half = total * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` >= 1 degrees of freedom.

    Newton's method on ``_student_t_cdf`` from the normal quantile, which lies below it: the CDF
    is concave there, so the iterates rise monotonically to the root."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"need 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    x = statistics.NormalDist().inv_cdf(p)
    for _ in range(100):
        step = (_student_t_cdf(x, df) - p) / _student_t_density(x, df)
        x -= step
        if abs(step) < 1e-12 * max(1.0, x):
            break
    return x


@dataclass(frozen=True)
class PairedGain:
    """The mean over seeds of (variant - baseline) overall accuracy, in points, with its 95%
    t-interval; ``wins``: seeds where the variant is higher. ``exceeds_noise``: the interval
    excludes 0 (the difference is larger than the seeds' spread can explain)."""

    mean: float
    low: float
    high: float
    wins: int
    seeds: int

    @property
    def exceeds_noise(self) -> bool:
        return self.low > 0 or self.high < 0

    def cell(self) -> str:
        mark = " *" if self.exceeds_noise else ""
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}]{mark}"


def paired_gain(differences: Sequence[float]) -> PairedGain:
    """``PairedGain`` of per-seed differences (points); needs two or more."""
    if len(differences) < 2:
        raise ValueError(f"a 95% interval needs >= 2 seeds, got {len(differences)}")
    mean, spread = statistics.fmean(differences), statistics.stdev(differences)
    half = student_t_quantile(0.975, len(differences) - 1) * spread / math.sqrt(len(differences))
    wins = sum(difference > 0 for difference in differences)
    return PairedGain(mean, mean - half, mean + half, wins, len(differences))


def _by_variant(runs: Sequence[StudentRun]) -> dict[str, list[StudentRun]]:
    grouped: dict[str, list[StudentRun]] = {}
    for run in runs:
        grouped.setdefault(run.variant, []).append(run)
    return grouped


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gains_over(runs: Sequence[StudentRun], baseline: str) -> dict[str, PairedGain]:
    """Each other variant's ``PairedGain`` over ``baseline``, on the seeds both have."""
    grouped = _by_variant(runs)
    base = {run.seed: run.accuracy[OVERALL] for run in grouped.get(baseline, [])}
    gains = {}
    for variant, group in grouped.items():
        paired = [
            100 * (run.accuracy[OVERALL] - base[run.seed]) for run in group if run.seed in base
        ]
        if variant != baseline and len(paired) >= 2:
            gains[variant] = paired_gain(paired)
    return gains


def results_markdown(
    config: DemoConfig,
    host_label: str,
    teacher: Accuracy,
    chance: Accuracy,
    runs: Sequence[StudentRun],
    seeds: int,
) -> str:
    """The accuracy table (mean ± std over seeds, %), each variant's overall gain over the
    ``BASELINES`` present, paired by seed, with its 95% interval, and the run's settings."""
    columns = list(teacher)
    grouped = _by_variant(runs)
    baselines = [name for name in BASELINES if name in grouped]
    gains = {name: gains_over(runs, name) for name in baselines}
    gain_headers = [f"− {name}, paired [95% CI]" for name in baselines]
    lines = [
        "| model | " + " | ".join([*columns, *gain_headers]) + " |",
        "|---|" + "---:|" * (len(columns) + len(gain_headers)),
    ]
    for name, accuracy in (("teacher", teacher), ("chance", chance)):
        cells = [f"{100 * accuracy[c]:.1f}" for c in columns] + [""] * len(gain_headers)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for variant, group in grouped.items():
        cells = [
            "{:.1f} ± {:.1f}".format(*_mean_std([100 * run.accuracy[c] for run in group]))
            for c in columns
        ]
        cells += [
            gains[name][variant].cell() if variant in gains[name] else "" for name in baselines
        ]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return (
        "# Switch-KD miniature replication\n\n"
        f"Path: {host_label}. Held-out test exact-match accuracy (%); students: mean ± std over "
        f"{seeds} seeds. Gains: mean over seeds of the paired difference in overall accuracy "
        "(points) with a 95% t-interval; * marks an interval that excludes 0, a difference "
        "larger than seed noise.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + _findings(gains)
        + _settings(config, runs)
    )


def _findings(gains: dict[str, dict[str, PairedGain]]) -> str:
    """One line per baseline: which variants differ from it by more than seed noise."""
    lines = []
    for baseline, by_variant in gains.items():
        above = [v for v, g in by_variant.items() if g.exceeds_noise and g.mean > 0]
        below = [v for v, g in by_variant.items() if g.exceeds_noise and g.mean < 0]
        within = [v for v, g in by_variant.items() if not g.exceeds_noise]
        lines.append(
            f"- Over {baseline}: above seed noise: {', '.join(above) or 'none'}; below: "
            f"{', '.join(below) or 'none'}; within noise: {', '.join(within) or 'none'}."
        )
    return "\n".join(lines) + "\n\n" if lines else ""


def _settings(config: DemoConfig, runs: Sequence[StudentRun]) -> str:
    s, t, v = config.student_schedule, config.teacher_schedule, config.vision_schedule
    start = (
        f"after a {config.student_warmup.steps}-step plain-SFT warm-up with the vision encoder "
        "frozen (one per seed, shared by its variants)"
        if config.student_warmup.steps
        else "from a random connector and LM (no warm-up)"
    )
    rule = config.early_stopping
    if rule is None:
        budget = f"{s.steps} steps each"
    else:
        best = [run.best_step for run in runs if run.best_step is not None]
        last = [run.last_step for run in runs if run.last_step is not None]
        budget = (
            f"at most {s.steps} steps, validation accuracy every {rule.eval_every} steps, stopped "
            f"after {rule.patience} evaluations without a gain, best checkpoint evaluated "
            f"(best steps {min(best, default=0)}–{max(best, default=0)}; "
            f"{sum(step >= s.steps for step in last)} of {len(last)} runs ended at the budget, "
            "not by early stopping)"
        )
    vision = (
        f"pretrained {v.steps} steps on per-cell shape/colour labels"
        if config.data_dir is None
        else f"pretrained {v.steps} steps without labels on the train images (masked patches)"
    )
    tv = config.teacher_vision
    teacher_vision = (
        f"its vision encoder tuned at {tv.lr_scale}x that rate"
        + (f" from step {tv.frozen_steps}" if tv.frozen_steps else "")
        + " (the students start from the shared one)"
        if tv.tuned
        else "its vision encoder frozen"
    )
    return (
        f"Shared vision encoder: {vision}; teacher and students start from it. Teacher: LM "
        f"{config.teacher.hidden_size}x{config.teacher.num_layers}, SFT {t.steps} steps, lr "
        f"{t.learning_rate}, {teacher_vision}. Students: LM {config.student.hidden_size}x"
        f"{config.student.num_layers}, {budget}, batch {s.batch_size}, lr {s.learning_rate}, "
        f"everything trained (sft_frozen_vision: all but the vision encoder), {start}.\n"
    )


def write_csv(path: Path, teacher: Accuracy, runs: Sequence[StudentRun]) -> None:
    """One row per model and seed (the teacher: seed empty), accuracies as fractions, the step
    of the evaluated checkpoint and the step training ended at (empty without early stopping)."""
    columns = list(teacher)
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "seed", *columns, "best_step", "last_step"])
        writer.writerow(["teacher", "", *(f"{teacher[c]:.4f}" for c in columns), "", ""])
        for run in runs:
            steps = ["" if step is None else step for step in (run.best_step, run.last_step)]
            writer.writerow(
                [run.variant, run.seed, *(f"{run.accuracy[c]:.4f}" for c in columns), *steps]
            )


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


def plot_accuracy(
    path: Path, teacher: Accuracy, chance: Accuracy, runs: Sequence[StudentRun]
) -> None:
    """Grouped bars: mean accuracy per question type per variant, std as error bars; the
    teacher and chance as markers."""
    plt = _pyplot()
    columns = list(teacher)
    grouped = _by_variant(runs)
    figure, axes = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(grouped)
    for i, (variant, group) in enumerate(grouped.items()):
        stats = [_mean_std([100 * run.accuracy[c] for run in group]) for c in columns]
        positions = [x + (i - (len(grouped) - 1) / 2) * width for x in range(len(columns))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=variant)
    for reference, style in ((teacher, "k_"), (chance, "r_")):
        axes.plot(range(len(columns)), [100 * reference[c] for c in columns], style, ms=40)
    axes.plot([], [], "k_", label="teacher")
    axes.plot([], [], "r_", label="chance")
    axes.set_xticks(range(len(columns)), columns)
    axes.set_ylabel("test exact match (%)")
    axes.set_ylim(0, 102)
    # Below the axes: inside, it would hide the teacher's markers near 100%.
    axes.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _term_curve(group: Sequence[StudentRun], term: str) -> tuple[list[int], list[float]]:
    """Mean over the seeds that reached it of a logged term, per logging step (early stopping
    ends runs at different steps)."""
    steps = sorted({entry["step"] for run in group for entry in run.log if term in entry})
    values = [
        statistics.fmean(
            entry[term]
            for run in group
            for entry in run.log
            if entry["step"] == step and term in entry
        )
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
            if any(term in entry for run in group for entry in run.log):
                axes.plot(*_term_curve(group, term), label=variant)
        axes.set_yscale("symlog", linthresh=1e-4)
        axes.set_xlabel("training step")
        axes.set_title(f"{term} term (per response token)")
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
