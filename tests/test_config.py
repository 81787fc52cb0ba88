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
    ],
)
def test_bad_values_fail_at_parse_time(overrides, message):
    values = {"distill": "switchkd", "teacher_model_path": "/t", **overrides}
    with pytest.raises(ValueError, match=message):
        SwitchKDArguments(**values)


def test_plain_sft_needs_no_teacher():
    assert not SwitchKDArguments(distill="switchkd", w_align=0.0, w_vsd=0.0).needs_teacher


def test_every_flag_has_help_and_is_in_the_readme():
    readme = README.read_text()
    for field in dataclasses.fields(SwitchKDArguments):
        assert field.metadata.get("help"), field.name
        assert f"`--{field.name}`" in readme, f"--{field.name} is not documented in README.md"
