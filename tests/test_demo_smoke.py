"""The built-in demo end to end, at smoke length: teacher, one SFT and one Switch-KD student,
evaluation table; the smoke teacher beats chance on the held-out test split."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from switchkd_plugin.demo.__main__ import _parser, main
from switchkd_plugin.demo.config import SMOKE_CONFIG
from switchkd_plugin.demo.data import check_dataset
from switchkd_plugin.demo.evaluation import OVERALL
from switchkd_plugin.demo.hosts import host_for
from switchkd_plugin.demo.pipeline import prepare, run_default
from switchkd_plugin.demo.report import accuracy_table
from switchkd_plugin.demo.shapes import QUESTION_TYPES, ShapesTaskConfig, write_llava_dataset
from switchkd_plugin.integrations.tinyllava.compat import factory_import_error


def test_chance_is_one_over_the_answers_per_type(tmp_path) -> None:
    task = ShapesTaskConfig(num_train=40, num_val=8, num_test=40)
    chance = check_dataset(write_llava_dataset(task, tmp_path).root).chance_accuracy()
    assert list(chance) == [*QUESTION_TYPES, OVERALL]
    assert chance["colour"] == pytest.approx(1 / 4) and chance["exists"] == pytest.approx(1 / 2)
    # The test split's types are equally frequent: overall is their plain mean.
    assert chance[OVERALL] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1 / 2) / 4)


def test_default_pipeline_end_to_end_and_teacher_beats_chance(tmp_path, capsys) -> None:
    rows = run_default(SMOKE_CONFIG, tmp_path)

    output = capsys.readouterr().out
    assert host_for(SMOKE_CONFIG.host).label in output  # it says which path it took
    assert accuracy_table(rows) in output
    assert list(rows) == ["teacher", "SFT student", "Switch-KD student", "chance"]
    for accuracy in rows.values():
        assert set(accuracy) == {*QUESTION_TYPES, OVERALL}
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    # Beats chance by more than two standard deviations of a guesser's accuracy on this split.
    chance, questions = rows["chance"][OVERALL], SMOKE_CONFIG.task.num_test
    assert rows["teacher"][OVERALL] > chance + 2 * math.sqrt(chance * (1 - chance) / questions)

    # A second run reuses the cached teacher instead of training it again.
    context = prepare(SMOKE_CONFIG, tmp_path)
    assert "reusing the cached one" in capsys.readouterr().out
    first = next(iter(context.teacher.state_dict().values()))
    assert torch.isfinite(first).all()


def _flags(parser) -> set[str]:
    return {
        flag for action in parser._actions for flag in action.option_strings if flag != "--help"
    } - {"-h"}


def test_help_without_a_command_shows_the_default_commands_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    commands = _parser()._subparsers._group_actions[0].choices
    missing = sorted(flag for flag in _flags(commands["run"]) if flag not in text)
    assert not missing, f"`--help` does not show the default command's {missing}"
    assert "replicate --help" in text


def _readme_flag_rows() -> list[list[str]]:
    """The cells of the flag table rows of docs/demo.md (the README links there)."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "demo.md").read_text()
    section = page.split("\n## ", 1)[0]  # the demo's own section, before its subsections
    return [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `--")]


def test_readme_demo_table_lists_exactly_the_cli_flags() -> None:
    documented = {
        flag for cells in _readme_flag_rows() for flag in re.findall(r"`(--[a-z-]+)`", cells[0])
    }
    commands = _parser()._subparsers._group_actions[0].choices
    assert documented == _flags(commands["run"]) | _flags(commands["replicate"])


def test_readme_demo_table_gives_the_cli_integer_defaults() -> None:
    """Each row whose default cell is integers, one per flag, states the CLI's defaults (of
    `replicate` where the row says so, else of `run`)."""
    commands = _parser()._subparsers._group_actions[0].choices
    checked = 0
    for flag_cell, default_cell, _ in _readme_flag_rows():
        flags = re.findall(r"`(--[a-z-]+)`", flag_cell)
        values = [value.strip() for value in default_cell.split(",")]
        if len(values) != len(flags) or not all(value.isdigit() for value in values):
            continue
        command = commands["replicate" if "(`replicate`)" in flag_cell else "run"]
        defaults = {
            flag: action.default for action in command._actions for flag in action.option_strings
        }
        for flag, value in zip(flags, values, strict=True):
            assert defaults[flag] == int(value), (
                f"docs/demo.md says {flag} {value}, CLI {defaults[flag]}"
            )
            checked += 1
    assert checked >= 6  # the step counts, --threads, --eval-every, --patience at least


@pytest.mark.skipif(factory_import_error() is None, reason="TinyLLaVA Factory is importable here")
def test_tinyllava_host_without_the_factory_is_a_clear_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--host", "tinyllava", "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "put a TinyLLaVA Factory checkout on PYTHONPATH" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any work


@pytest.mark.parametrize(
    "argv",
    [
        ["--student-steps", "0"],
        ["--teacher-steps", "-5"],
        ["--student-warmup-steps", "-1"],
        ["--threads", "0"],
        ["replicate", "--seeds", "0"],
    ],
)
def test_cli_rejects_step_counts_out_of_range(argv, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--cache-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "must be >= " in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
