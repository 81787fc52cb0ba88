"""The miniature replication's outputs: the markdown table (mean ± std, paired gains over the
baselines with 95% intervals), the CSV, the plots, early stopping, resuming from finished runs."""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics

import pytest
import torch
import transformers
from torch import nn

from switchkd_plugin.demo.config import SMOKE_CONFIG, DemoConfig, EarlyStopping, TrainSchedule
from switchkd_plugin.demo.evaluation import OVERALL
from switchkd_plugin.demo.experiment import replicate
from switchkd_plugin.demo.report import paired_gain, results_markdown, student_t_quantile
from switchkd_plugin.demo.shapes import QUESTION_TYPES, ShapesTaskConfig
from switchkd_plugin.demo.students import StudentRun, switchkd_arguments
from switchkd_plugin.demo.training import BestCheckpoint

COLUMNS = (*QUESTION_TYPES, OVERALL)
CHANCE = {column: 0.4 for column in COLUMNS}


def _run(variant: str, seed: int, overall: float) -> StudentRun:
    accuracy = {column: 0.5 for column in COLUMNS}
    accuracy[OVERALL] = overall
    return StudentRun(variant, seed, accuracy, log=[])


def _row(table: str, name: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.995])
def test_t_quantile_matches_the_closed_forms(p: float) -> None:
    # Closed forms exist for 1, 2 and 4 degrees of freedom (Cauchy; Hill 1970).
    alpha = 4 * p * (1 - p)
    exact = {
        1: math.tan(math.pi * (p - 0.5)),
        2: (2 * p - 1) / math.sqrt(2 * p * (1 - p)),
        4: 2 * math.sqrt(math.cos(math.acos(math.sqrt(alpha)) / 3) / math.sqrt(alpha) - 1),
    }
    for df, value in exact.items():
        assert student_t_quantile(p, df) == pytest.approx(value, rel=1e-6), df


def test_t_quantile_for_many_degrees_of_freedom_follows_its_expansion() -> None:
    # Cornish-Fisher expansion around the normal quantile z; the next term is O(df^-3).
    z, df = statistics.NormalDist().inv_cdf(0.975), 200
    expansion = z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    assert student_t_quantile(0.975, df) == pytest.approx(expansion, rel=1e-6)
    with pytest.raises(ValueError, match=r"0\.5 < p < 1"):
        student_t_quantile(0.3, 4)


def test_paired_gain_interval_and_noise_verdict() -> None:
    differences = [1.0, 3.0, 2.0, 4.0, 5.0]
    gain = paired_gain(differences)
    half = student_t_quantile(0.975, 4) * statistics.stdev(differences) / math.sqrt(5)
    assert gain.mean == pytest.approx(3.0)
    assert (gain.low, gain.high) == pytest.approx((3.0 - half, 3.0 + half))
    assert gain.exceeds_noise and gain.wins == 5
    assert not paired_gain([2.0, -3.0, 1.0]).exceeds_noise
    with pytest.raises(ValueError, match=">= 2 seeds"):
        paired_gain([1.0])


def test_table_gives_mean_std_and_paired_gains_over_both_baselines() -> None:
    sft, frozen, other = [0.50, 0.60, 0.40], [0.52, 0.61, 0.45], [0.55, 0.66, 0.47]
    runs = [_run("sft", seed, value) for seed, value in enumerate(sft)]
    runs += [_run("sft_frozen_vision", seed, value) for seed, value in enumerate(frozen)]
    runs += [_run("switchkd", seed, value) for seed, value in enumerate(other)]
    teacher = {column: 0.9 for column in COLUMNS}

    table = results_markdown(SMOKE_CONFIG, "some path", teacher, CHANCE, runs, seeds=3)

    assert "Path: some path." in table
    cells = _row(table, "switchkd")
    assert cells[COLUMNS.index(OVERALL)] == (
        f"{100 * statistics.fmean(other):.1f} ± {100 * statistics.stdev(other):.1f}"
    )
    gains = {}
    for column, name, base in ((-2, "sft", sft), (-1, "sft_frozen_vision", frozen)):
        gains[name] = paired_gain([100 * (b - a) for a, b in zip(base, other, strict=True)])
        assert cells[column] == gains[name].cell()
    # +5, +6, +7 over sft: beyond seed noise; +3, +5, +2 over the control: within it (3 seeds).
    assert gains["sft"].exceeds_noise and cells[-2].endswith("*")
    assert not gains["sft_frozen_vision"].exceeds_noise and not cells[-1].endswith("*")
    assert _row(table, "sft")[-2] == ""  # no gain over itself
    assert _row(table, "teacher")[0] == "90.0" and _row(table, "teacher")[-1] == ""
    assert _row(table, "chance")[len(COLUMNS) - 1] == "40.0"
    assert "- Over sft: above seed noise: switchkd;" in table
    assert "- Over sft_frozen_vision: above seed noise: none;" in table


def test_table_without_a_baseline_has_no_gain_column() -> None:
    runs = [_run("dbild", seed, 0.5) for seed in range(2)]
    table = results_markdown(SMOKE_CONFIG, "p", {c: 0.9 for c in COLUMNS}, CHANCE, runs, seeds=2)
    assert "paired" not in table.split("\n\n")[2] and len(_row(table, "dbild")) == len(COLUMNS)


def test_best_checkpoint_stops_after_patience_and_restores_the_best_state() -> None:
    model = nn.Linear(2, 1)
    scores = iter([0.1, 0.3, 0.2, 0.3, 0.25, 0.9])
    stopper = BestCheckpoint(model, lambda: next(scores), EarlyStopping(eval_every=10, patience=3))
    state, control = transformers.TrainerState(max_steps=100), transformers.TrainerControl()
    weights = {}
    for step in range(1, 61):
        with torch.no_grad():
            model.weight.fill_(float(step))  # a different state at every step
        state.global_step = step
        stopper.on_step_end(None, state, control)
        weights[step] = model.weight.clone()
        if control.should_training_stop:
            break
    # Scored at 10..50; the tie at 40 is no gain; three scores without a gain end it at 50.
    assert stopper.history == [(10, 0.1), (20, 0.3), (30, 0.2), (40, 0.3), (50, 0.25)]
    assert step == 50 and stopper.best_step == 20
    stopper.restore()
    assert torch.equal(model.weight, weights[20])


def _tiny_replication(student_steps: int, **overrides) -> DemoConfig:
    """The smoke config on the HF LLaVA host, small enough for a replication in seconds."""
    return dataclasses.replace(
        SMOKE_CONFIG,
        host="hf_llava",
        task=ShapesTaskConfig(num_train=64, num_val=16, num_test=24, seed=2, object_fraction=0.85),
        vision_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=16),
        teacher_schedule=TrainSchedule(steps=3, learning_rate=1e-3, batch_size=4),
        student_schedule=TrainSchedule(
            steps=student_steps, learning_rate=1e-3, batch_size=4, logging_steps=2
        ),
        **overrides,
    )


def test_replicate_with_early_stopping_writes_every_output_and_resumes(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib", reason="the plots need the demo extra: .[demo]")
    config = _tiny_replication(8, early_stopping=EarlyStopping(eval_every=2, patience=2))
    out = tmp_path / "results"
    variants = ["sft", "switchkd"]

    runs = replicate(config, tmp_path / "cache", out, seeds=2, variants=variants)

    assert [(run.variant, run.seed) for run in runs] == [
        ("sft", 0),
        ("switchkd", 0),
        ("sft", 1),
        ("switchkd", 1),
    ]
    for run in runs:
        steps = [step for step, _ in run.val_history]
        assert steps == list(range(2, 2 * len(steps) + 1, 2)) and steps[-1] <= 8
        best = max(score for _, score in run.val_history)
        assert run.best_step == next(step for step, score in run.val_history if score == best)
    for name in ("results.md", "results.csv", "accuracy.png", "vsd_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [(row["model"], row["seed"]) for row in rows] == [
        ("teacher", ""),
        *((run.variant, str(run.seed)) for run in runs),
    ]
    assert float(rows[1][OVERALL]) == pytest.approx(runs[0].accuracy[OVERALL], abs=1e-4)
    assert rows[1]["best_step"] == str(runs[0].best_step)
    assert rows[1]["last_step"] == str(runs[0].val_history[-1][0])
    # The VSD term is logged for the Switch-KD students (the plot's data).
    assert all("vsd" in entry for entry in runs[1].log)
    first_table = (out / "results.md").read_text()
    assert "− sft, paired [95% CI]" in first_table and "best checkpoint evaluated" in first_table
    at_budget = sum(run.val_history[-1][0] == 8 for run in runs)
    assert f"{at_budget} of 4 runs ended at the budget" in first_table
    capsys.readouterr()

    again = replicate(config, tmp_path / "cache", out, seeds=2, variants=variants)

    assert capsys.readouterr().out.count("reusing") == 2 + 4  # vision, teacher, four runs
    assert again == runs and (out / "results.md").read_text() == first_table


def test_the_onpolicy_variant_is_switchkd_with_half_its_batches_on_policy() -> None:
    onpolicy = switchkd_arguments("switchkd_onpolicy", max_new_tokens=3)
    assert (onpolicy.lmbda, onpolicy.max_new_tokens, onpolicy.generation_temperature) == (
        0.5,
        3,
        1.0,
    )
    assert dataclasses.replace(onpolicy, lmbda=0.0) == switchkd_arguments("switchkd", 3)


def test_adding_the_onpolicy_variant_reuses_every_finished_run_and_trains_it_on_policy(
    tmp_path, capsys
) -> None:
    """The variant enters no cache key: a replication it joins reuses the vision encoder, the
    teacher and the other variants' runs; its students log on-policy micro-batches."""
    pytest.importorskip("matplotlib", reason="the plots need the demo extra: .[demo]")
    config = _tiny_replication(6)
    before = replicate(config, tmp_path / "cache", tmp_path / "out", seeds=2, variants=["sft"])
    capsys.readouterr()

    runs = replicate(
        config, tmp_path / "cache", tmp_path / "out", seeds=2, variants=["sft", "switchkd_onpolicy"]
    )

    assert capsys.readouterr().out.count("reusing") == 2 + 2  # vision, teacher, both sft runs
    assert [run for run in runs if run.variant == "sft"] == before
    for run in runs[1::2]:
        onpolicy = sum(entry["onpolicy_batches"] for entry in run.log)
        assert 0 < onpolicy < 6 and all("vsd" in entry for entry in run.log)


def test_replicate_rejects_unknown_variants(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown variants"):
        replicate(SMOKE_CONFIG, tmp_path, tmp_path, seeds=1, variants=["sft", "distill-harder"])
