"""The miniature replication's outputs: the markdown table (mean ± std, paired gain over SFT),
the CSV, the plots, and resuming from finished runs."""

from __future__ import annotations

import csv
import dataclasses
import statistics

import pytest

from switchkd_plugin.demo.experiment import COLUMNS, replicate, results_markdown
from switchkd_plugin.demo.pipeline import (
    OVERALL,
    SMOKE_CONFIG,
    StudentRun,
    TrainSchedule,
    chance_accuracy,
)
from switchkd_plugin.demo.shapes import ShapesTaskConfig


def _run(variant: str, seed: int, overall: float) -> StudentRun:
    accuracy = {column: 0.5 for column in COLUMNS}
    accuracy[OVERALL] = overall
    return StudentRun(variant, seed, accuracy, log=[])


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


def test_table_gives_mean_std_and_the_gain_over_sft_paired_by_seed() -> None:
    sft, other = [0.50, 0.60, 0.40], [0.55, 0.62, 0.49]
    runs = [_run("sft", seed, value) for seed, value in enumerate(sft)]
    runs += [_run("switchkd", seed, value) for seed, value in enumerate(other)]
    teacher = {column: 0.9 for column in COLUMNS}

    table = results_markdown(SMOKE_CONFIG, "some path", teacher, runs, seeds=3)

    assert "Path: some path." in table
    cells = _row(table, "switchkd")
    assert cells[COLUMNS.index(OVERALL)] == (
        f"{100 * statistics.fmean(other):.1f} ± {100 * statistics.stdev(other):.1f}"
    )
    gains = [100 * (b - a) for a, b in zip(sft, other, strict=True)]
    assert cells[-1] == f"{statistics.fmean(gains):.1f} ± {statistics.stdev(gains):.1f}"
    assert _row(table, "sft")[-1] == "0.0 ± 0.0"
    assert _row(table, "teacher")[0] == "90.0" and _row(table, "teacher")[-1] == ""
    assert _row(table, "chance")[-2] == f"{100 * chance_accuracy()[OVERALL]:.1f}"


def test_table_without_an_sft_variant_has_no_gain_column() -> None:
    runs = [_run("dbild", seed, 0.5) for seed in range(2)]
    table = results_markdown(SMOKE_CONFIG, "p", {c: 0.9 for c in COLUMNS}, runs, seeds=2)
    assert "paired" not in table and len(_row(table, "dbild")) == len(COLUMNS)


def test_replicate_writes_every_output_and_resumes_from_finished_runs(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="the plots need the demo extra: .[demo]")
    config = dataclasses.replace(
        SMOKE_CONFIG,
        host="hf_llava",
        task=ShapesTaskConfig(num_train=64, num_val=0, num_test=24, seed=2, object_fraction=0.85),
        vision_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=16),
        teacher_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=4),
        student_schedule=TrainSchedule(steps=4, learning_rate=1e-3, batch_size=4, logging_steps=2),
    )
    out = tmp_path / "results"

    runs = replicate(config, tmp_path / "cache", out, seeds=2, variants=["sft", "switchkd"])

    assert [(run.variant, run.seed) for run in runs] == [
        ("sft", 0),
        ("switchkd", 0),
        ("sft", 1),
        ("switchkd", 1),
    ]
    for name in ("results.md", "results.csv", "accuracy.png", "vsd_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["seed"]) for row in rows] == [
        ("teacher", ""),
        *((run.variant, str(run.seed)) for run in runs),
    ]
    assert float(rows[1][OVERALL]) == pytest.approx(runs[0].accuracy[OVERALL], abs=1e-4)
    # The VSD term is logged for the Switch-KD students (the plot's data).
    assert all("vsd" in entry for entry in runs[1].log)
    first_table = (out / "results.md").read_text()
    capsys.readouterr()

    again = replicate(config, tmp_path / "cache", out, seeds=2, variants=["sft", "switchkd"])

    assert capsys.readouterr().out.count("reusing") == 2 + 4  # vision, teacher, four runs
    assert again == runs and (out / "results.md").read_text() == first_table


def test_replicate_rejects_unknown_variants(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown variants"):
        replicate(SMOKE_CONFIG, tmp_path, tmp_path, seeds=1, variants=["sft", "distill-harder"])
