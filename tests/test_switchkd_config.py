"""`SwitchKDConfig`: Switch-KD settings parsed, trained with, saved in checkpoints, checked on
resume, through the real Trainer on the tiny LLaVA pair."""

from __future__ import annotations

import copy
import json
import logging
import re

import pytest
import transformers
from transformers.trainer_utils import SchedulerType

from switchkd_plugin import SwitchKDArguments, SwitchKDConfig, SwitchKDTrainer
from switchkd_plugin.constants import TOKENIZER_KWARG
from switchkd_plugin.testing import make_host_batch
from switchkd_plugin.testing.trainer import Batches, first_item
from switchkd_plugin.training.resume import SETTINGS_FILE

SAVE_AT = 2


def _parse(out, *flags: str) -> SwitchKDConfig:
    argv = [
        "--output_dir", str(out),
        "--per_device_train_batch_size", "1",
        "--max_steps", str(SAVE_AT),
        "--save_strategy", "steps",
        "--save_steps", str(SAVE_AT),
        "--optim", "sgd",
        "--learning_rate", "0.1",
        "--lr_scheduler_type", "constant",
        "--report_to", "none",
        "--remove_unused_columns", "False",
        "--use_cpu", "True",
        "--disable_tqdm", "True",
        "--distill", "switchkd",
        "--teacher_model_path", "given-as-object",
        "--w_vsd", "0.5",
        *flags,
    ]  # fmt: skip
    (config,) = transformers.HfArgumentParser((SwitchKDConfig,)).parse_args_into_dataclasses(
        args=argv
    )
    return config


def make_trainer(student, teacher, tokenizer, batches, config: SwitchKDConfig) -> SwitchKDTrainer:
    return SwitchKDTrainer(
        model=copy.deepcopy(student),
        args=config,
        train_dataset=Batches(batches),
        data_collator=first_item,
        teacher_model=teacher,
        teacher_tokenizer=tokenizer,
        **{TOKENIZER_KWARG: tokenizer},
    )


@pytest.fixture
def checkpointed(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    """A 2-step run from a parsed command line; (its checkpoint, a resume under new flags)."""
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=s) for s in range(4)]
    first = make_trainer(hf_student, hf_teacher, tiny_tokenizer, batches, _parse(tmp_path / "a"))
    first.train()
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_AT}"

    def resume(*flags: str, last_in_output_dir: bool = False) -> SwitchKDTrainer:
        out = tmp_path / ("a" if last_in_output_dir else "b")
        config = _parse(out, "--max_steps", str(SAVE_AT + 1), *flags)
        trainer = make_trainer(hf_student, hf_teacher, tiny_tokenizer, batches, config)
        trainer.train(resume_from_checkpoint=True if last_in_output_dir else str(checkpoint))
        return trainer

    return checkpoint, resume


def test_parsed_config_runs_both_post_inits():
    config = _parse("unused", "--temperature", "2.5", "--k_mode", "fixed")
    assert (config.temperature, config.k_mode, config.w_vsd) == (2.5, "fixed", 0.5)
    assert config.max_steps == SAVE_AT
    assert isinstance(config.lr_scheduler_type, SchedulerType)  # TrainingArguments' post-init
    with pytest.raises(ValueError, match="--temperature must be > 0"):  # Switch-KD's
        _parse("unused", "--temperature", "0")


def test_config_and_switchkd_args_together_are_refused(hf_student, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="drop switchkd_args="):
        SwitchKDTrainer(
            model=hf_student,
            args=_parse(tmp_path),
            switchkd_args=SwitchKDArguments(),
            **{TOKENIZER_KWARG: tiny_tokenizer},
        )


def test_the_checkpoint_saves_the_settings_and_resumes_under_them(checkpointed):
    checkpoint, resume = checkpointed
    saved = json.loads((checkpoint / SETTINGS_FILE).read_text())["settings"]
    assert saved["w_vsd"] == 0.5 and saved["distill"] == "switchkd"
    trainer = resume()
    assert trainer.state.global_step == SAVE_AT + 1
    assert trainer._engine is not None and trainer.switchkd_args.w_vsd == 0.5


@pytest.mark.parametrize(
    ("flags", "change", "restore"),
    [
        (("--w_vsd", "1.0"), "--w_vsd was 0.5, now 1.0", "--w_vsd 0.5"),
        (("--temperature", "2.0"), "--temperature was 3.0, now 2.0", "--temperature 3.0"),
        (("--k_max", "100"), "--k_max was None, now 100", "no --k_max"),  # saved unset
    ],
)
def test_resuming_under_a_changed_objective_is_refused(checkpointed, flags, change, restore):
    _, resume = checkpointed
    with pytest.raises(ValueError) as refusal:
        resume(*flags)
    message = str(refusal.value)
    assert change in message
    assert f"Resume with the saved settings ({restore})" in message
    assert "start a new run" in message


def test_resuming_the_last_checkpoint_of_output_dir_is_checked_too(checkpointed):
    _, resume = checkpointed
    with pytest.raises(ValueError, match=re.escape("--w_vsd was 0.5, now 1.0")):
        resume("--w_vsd", "1.0", last_in_output_dir=True)


def test_a_safe_change_resumes_and_says_why(checkpointed, caplog):
    _, resume = checkpointed
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin.training.resume"):
        trainer = resume("--lm_head_chunk_size", "3")
    assert trainer.state.global_step == SAVE_AT + 1
    assert "--lm_head_chunk_size 3 (saved: 1024), safe to change: memory" in caplog.text
