"""Switch-KD arguments: parsed next to the host's, validated early, every flag documented."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import transformers

from switchkd_plugin import SwitchKDArguments

README = Path(__file__).resolve().parents[1] / "README.md"


def test_parsed_with_training_arguments_by_hf_argument_parser(tmp_path):
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, SwitchKDArguments))
    training, kd = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--distill", "switchkd", "--teacher_model_path", "/t",
         "--w_vsd", "0.5", "--k_max", "64", "--align_loss", "bild", "--switch_point", "connector",
         "--teacher_gradient_checkpointing", "True", "--use_cpu", "True"]
    )  # fmt: skip
    assert training.output_dir == str(tmp_path)
    assert (kd.distill, kd.teacher_model_path, kd.w_vsd, kd.k_max) == ("switchkd", "/t", 0.5, 64)
    assert kd.align_loss == "bild" and kd.switch_point == "connector"
    assert kd.teacher_gradient_checkpointing and kd.needs_teacher


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"w_vsd": -1.0}, "--w_vsd must be >= 0"),
        ({"temperature": 0.0}, "--temperature must be > 0"),
        ({"vsd_loss": "mse"}, r"--vsd_loss 'mse': choose one of \('dbild', 'bild', 'fkl', 'rkl'\)"),
        ({"lm_head_chunk_size": -2}, "--lm_head_chunk_size must be >= 0"),
        ({"teacher_model_path": None}, "needs --teacher_model_path DIR"),
        ({"k_min": 1}, "--k_min must be >= 2"),
        ({"k_min": 8, "k_max": 4}, "--k_max 4 is below --k_min 8"),
        ({"k_min": 300}, "--k_min 300 exceeds --kneedle_window 256"),
        ({"kneedle_window": 1}, "--kneedle_window 1 leaves no curve"),
        ({"fixed_k": 1}, "--fixed_k must be >= 2"),
        ({"teacher_attn_implementation": "fast"}, r"--teacher_attn_implementation 'fast': choose"),
        ({"nonfinite": "ignore"}, r"--nonfinite 'ignore': choose one of \('error', 'skip'\)"),
        ({"nonfinite_max_in_a_row": 0}, "--nonfinite_max_in_a_row must be >= 1"),
    ],
)
def test_bad_values_fail_at_parse_time(overrides, message):
    values = {"distill": "switchkd", "teacher_model_path": "/t", **overrides}
    with pytest.raises(ValueError, match=message):
        SwitchKDArguments(**values)


def test_bad_values_fail_when_parsed_from_the_command_line(tmp_path):
    parser = transformers.HfArgumentParser((transformers.TrainingArguments, SwitchKDArguments))
    with pytest.raises(ValueError, match="--k_max 3 is below --k_min 4"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--k_min", "4", "--k_max", "3"]
        )


def test_k_options_are_checked_against_the_vocabulary_once_known():
    SwitchKDArguments(k_mode="fixed", fixed_k=600).check_k_options(600)
    with pytest.raises(ValueError, match="--fixed_k 601 exceeds the distilled vocabulary of 600"):
        SwitchKDArguments(k_mode="fixed", fixed_k=601).check_k_options(600)
    with pytest.raises(ValueError, match="--k_min 200 exceeds the distilled vocabulary of 100"):
        SwitchKDArguments(k_min=200).check_k_options(100)
    SwitchKDArguments(k_min=200, align_loss="fkl", vsd_loss="rkl").check_k_options(100)  # no DBiLD


def test_plain_sft_needs_no_teacher():
    assert not SwitchKDArguments(distill="switchkd", w_align=0.0, w_vsd=0.0).needs_teacher


def _readme_flag_defaults() -> dict[str, str]:
    """Flag -> default cell of the README's "Switch-KD arguments" table."""
    section = README.read_text().split("## Switch-KD arguments", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| `--")]
    return {
        flag.strip().strip("`").removeprefix("--"): default.strip() for flag, default, _ in rows
    }


def test_every_flag_has_help_and_its_readme_row_gives_the_default():
    """A default in backticks is the value itself; a default left unset (None) is described
    in words (the student's, the window, —)."""
    documented = _readme_flag_defaults()
    fields = dataclasses.fields(SwitchKDArguments)
    assert set(documented) == {field.name for field in fields}, "README table != the flags"
    for field in fields:
        assert field.metadata.get("help"), field.name
        cell = documented[field.name]
        if field.default is None:
            assert not cell.startswith("`"), f"README gives --{field.name} {cell}, code: unset"
        else:
            assert cell == f"`{field.default}`", (
                f"README gives --{field.name} {cell}, code: {field.default!r}"
            )
