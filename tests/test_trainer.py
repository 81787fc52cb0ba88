"""SwitchKDTrainer through the real Hugging Face Trainer, on real tiny VLMs."""

from __future__ import annotations

import copy
import json
import logging
import os
import re

import pytest
import torch
import transformers
from packaging.version import Version

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.constants import TOKENIZER_KWARG
from switchkd_plugin.testing import (
    IGNORE_INDEX,
    build_hf_llava,
    build_tokenizer,
    make_host_batch,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing.tensor_close import assert_close
from switchkd_plugin.testing.trainer import (
    Batches,
    assert_same_step,
    make_trainer,
    split_batch,
    training_args,
)
from switchkd_plugin.training.fsdp import FSDP2_TRANSFORMERS
from switchkd_plugin.training.trainer import (
    SwitchKDTrainer,
    switchkd_trainer_class,
)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert_close(x, y, slack=0, name=name)


def _assert_same_update(a: torch.nn.Module, b: torch.nn.Module, start: torch.nn.Module) -> None:
    assert_same_step(a.state_dict(), b.state_dict(), start.state_dict())


def test_distill_none_and_zero_weights_train_exactly_like_plain_sft(
    models, tiny_tokenizer, tmp_path
):
    student, teacher = models
    batches = [make_host_batch(student, tiny_tokenizer, n=3, seed=seed) for seed in range(2)]
    plain = copy.deepcopy(student)
    training = {"max_steps": 2}
    make_trainer(
        plain,
        tiny_tokenizer,
        batches,
        tmp_path,
        trainer_class=transformers.Trainer,
        training=training,
    ).train()
    none = make_trainer(
        copy.deepcopy(student), tiny_tokenizer, batches, tmp_path, distill="none", training=training
    )
    assert none.teacher is None
    none.train()
    _assert_same_weights(none.model, plain)
    zero = make_trainer(
        copy.deepcopy(student),
        tiny_tokenizer,
        batches,
        tmp_path,
        teacher=teacher,
        w_align=0.0,
        w_vsd=0.0,
        training=training,
    )
    assert zero.teacher is None  # weights 0: the teacher is never loaded
    zero.train()
    _assert_same_update(zero.model, plain, student)


@pytest.mark.parametrize("sizes", [(2, 2), (1, 3)])
def test_gradient_accumulation_averages_over_the_whole_window(
    models, tiny_tokenizer, tmp_path, sizes
):
    """One step over micro-batches of different token counts == one step over their union."""
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=4, seed=7)
    micro = split_batch(batch, sizes)
    counts = [int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro]
    assert counts[0] != counts[1]  # a mean of micro-batch means would be wrong here
    # Train each trainer right after building it: accelerate keeps the accumulation steps in a
    # process-wide singleton, so a second Trainer's setting would leak into the first.
    whole = make_trainer(copy.deepcopy(student), tiny_tokenizer, [batch], tmp_path, teacher=teacher)
    whole.train()
    accumulated = make_trainer(
        copy.deepcopy(student),
        tiny_tokenizer,
        micro,
        tmp_path,
        teacher=teacher,
        training={"gradient_accumulation_steps": 2},
    )
    accumulated.train()
    _assert_same_update(accumulated.model, whole.model, student)
    # The Trainer's own report is the window's token mean too, whatever it divides by.
    logged = [
        [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        for trainer in (accumulated, whole)
    ]
    # 4.x logs losses rounded to 4 decimals: one rounding each side.
    assert_close(torch.tensor(logged[0]), torch.tensor(logged[1]), terms=8, extra=1e-4, name="loss")


class _BackwardWithoutAccelerate(transformers.Trainer):
    """A host whose training_step skips accelerator.backward (as apex does)."""

    def training_step(self, model, inputs, *args, **kwargs):
        loss = self.compute_loss(model, inputs)
        loss.backward()
        return loss.detach()


def test_a_host_that_bypasses_accelerate_backward_is_refused_before_a_step(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    student = copy.deepcopy(hf_student).train()
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=3)]
    trainer = make_trainer(
        student,
        tiny_tokenizer,
        batches,
        tmp_path,
        teacher=hf_teacher,
        trainer_class=switchkd_trainer_class(_BackwardWithoutAccelerate),
    )
    with pytest.raises(RuntimeError, match=r"without accelerator\.backward"):
        trainer.train()
    _assert_same_weights(student, hf_student)


def test_teacher_stays_frozen_outside_model_optimizer_and_checkpoint(
    models, tiny_tokenizer, tmp_path
):
    student, teacher = models
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in range(3)]
    trainer = make_trainer(
        student,
        tiny_tokenizer,
        batches,
        tmp_path,
        teacher=teacher,
        training={"max_steps": 3, "optim": "adamw_torch", "learning_rate": 1e-2},
    )
    trainer.train()
    assert trainer.teacher is teacher and not teacher.training
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), f"teacher weight {key} changed"
    teacher_ids = {id(p) for p in teacher.parameters()}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimised
    assert not teacher_ids & {id(p) for p in trainer.model.parameters()}
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = type(student).from_pretrained(str(tmp_path / "saved"))
    assert set(reloaded.state_dict()) == set(student.state_dict())


def test_short_run_lowers_every_term_and_logs_them(models, tiny_tokenizer, tmp_path):
    student, teacher = models
    batches = [make_host_batch(student, tiny_tokenizer, n=4, seed=s) for s in range(2)]
    adam = {"optim": "adamw_torch", "learning_rate": 3e-3}
    # A random teacher has flat logits that a learning student moves away from: give it a few
    # SFT steps on the same data first, as a real teacher would have had.
    teacher.requires_grad_(True).train()
    make_trainer(
        teacher,
        tiny_tokenizer,
        batches,
        tmp_path,
        trainer_class=transformers.Trainer,
        training={"max_steps": 30, **adam},
    ).train()
    teacher.requires_grad_(False).eval()
    trainer = make_trainer(
        student,
        tiny_tokenizer,
        batches,
        tmp_path,
        teacher=teacher,
        training={"max_steps": 30, **adam},
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert len(logs) == 30
    for key in (
        "ce",
        "align",
        "vsd",
        "total",
        "align_k_teacher_mean",
        "align_k_student_mean",
        "align_k_teacher_at_min",
        "vsd_k_student_mean",
        "distilled_tokens",
    ):
        assert key in logs[0], key
    for term in ("ce", "align", "vsd", "total"):
        first = sum(entry[term] for entry in logs[:2]) / 2
        last = sum(entry[term] for entry in logs[-2:]) / 2
        assert last < 0.8 * first, f"{term}: {first:.4f} -> {last:.4f}"
    assert 2 <= logs[0]["align_k_teacher_mean"] <= 256


def test_batch_without_response_tokens_keeps_training(models, tiny_tokenizer, tmp_path):
    student, teacher = models
    empty = make_host_batch(student, tiny_tokenizer, n=2, seed=1)
    empty["labels"] = torch.full_like(empty["labels"], IGNORE_INDEX)
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=2), empty]
    trainer = make_trainer(
        student, tiny_tokenizer, batches, tmp_path, teacher=teacher, training={"max_steps": 4}
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(loss == loss for loss in losses)  # no NaN
    assert any(
        entry["distilled_tokens"] == 0 for entry in trainer.state.log_history if "ce" in entry
    )


# ---------------------------------------------------------------------------- checks before step 1


def test_different_tokenizers_are_refused(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    other = build_tokenizer(vocab_size=500)
    with pytest.raises(ValueError, match=r"tokenizers differ on \d+ tokens"):
        SwitchKDTrainer(
            model=copy.deepcopy(hf_student),
            args=training_args(tmp_path),
            switchkd_args=SwitchKDArguments(distill="switchkd", teacher_model_path="x"),
            teacher_model=copy.deepcopy(hf_teacher),
            teacher_tokenizer=other,
            **{TOKENIZER_KWARG: tiny_tokenizer},
        )


def test_padded_lm_heads_over_one_tokenizer_distil_the_shared_vocabulary(
    hf_student, tiny_tokenizer, tmp_path, caplog
):
    teacher = build_hf_llava(teacher_spec(vocab_multiple_of=64), tiny_tokenizer)
    assert adapter_for(teacher).lm_head.weight.shape[0] == 640 > len(tiny_tokenizer)
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2)]
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        trainer = make_trainer(
            copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, teacher=teacher
        )
    assert "shared tokenizer vocabulary of 600 tokens" in caplog.text
    assert trainer._engine.vocab == 600
    trainer.train()


def test_vision_width_mismatch_is_refused(tiny_tokenizer, hf_teacher, tmp_path):
    student = build_hf_llava(student_spec(vision_hidden_size=48), tiny_tokenizer)
    with pytest.raises(ValueError, match=r"output has width 48 .* connector input is 32"):
        make_trainer(student, tiny_tokenizer, [], tmp_path, teacher=copy.deepcopy(hf_teacher))
    with pytest.raises(ValueError, match=r"--switch_point connector.*width 64.*hidden size is 96"):
        make_trainer(
            build_hf_llava(student_spec(), tiny_tokenizer),
            tiny_tokenizer,
            [],
            tmp_path,
            teacher=copy.deepcopy(hf_teacher),
            switch_point="connector",
        )


def test_teacher_path_is_checked_and_loaded(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    student = copy.deepcopy(hf_student)
    with pytest.raises(ValueError, match=r"needs --teacher_model_path DIR"):
        SwitchKDArguments(distill="switchkd")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        make_trainer(
            student, tiny_tokenizer, [], tmp_path, teacher_model_path=str(tmp_path / "nope")
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        make_trainer(
            student, tiny_tokenizer, [], tmp_path, teacher_model_path=str(tmp_path / "empty")
        )
    saved = tmp_path / "teacher"
    hf_teacher.save_pretrained(str(saved))
    tiny_tokenizer.save_pretrained(str(saved))
    trainer = make_trainer(
        student,
        tiny_tokenizer,
        [make_host_batch(student, tiny_tokenizer)],
        tmp_path,
        teacher_model_path=str(saved),
    )
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, hf_teacher.state_dict()[key])
    trainer.train()


def test_broken_teacher_directories_say_what_is_wrong(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    saved = tmp_path / "teacher"
    hf_teacher.save_pretrained(str(saved))
    with pytest.raises(FileNotFoundError, match=r"holds no tokenizer files \(none of tokenizer"):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, [], tmp_path,
                 teacher_model_path=str(saved))  # fmt: skip
    tiny_tokenizer.save_pretrained(str(saved))
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    with pytest.raises(ValueError, match=r"teacher.*model\.safetensors is truncated or corrupt"):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, [], tmp_path,
                 teacher_model_path=str(saved))  # fmt: skip


@pytest.mark.parametrize("change", ["drop", "extra", "reshape"])
def test_a_teacher_load_that_leaves_a_weight_unmatched_is_refused(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path, change
):
    """transformers only warns when a checkpoint lacks a weight (left random) or has one the
    class does not use; a teacher load refuses both, and weights of another shape, naming them."""
    from safetensors.torch import load_file, save_file

    saved = tmp_path / "teacher"
    hf_teacher.save_pretrained(str(saved))
    tiny_tokenizer.save_pretrained(str(saved))
    weights = saved / "model.safetensors"
    state = load_file(weights)
    # the saved key layout differs by release (5.x: `multi_modal_projector.*`, model: `model.*`)
    key = next(k for k in state if k.endswith("multi_modal_projector.linear_1.bias"))
    expected = {
        "drop": r"1 missing keys \([\w.]*multi_modal_projector\.linear_1\.bias\)",
        "extra": r"1 unexpected keys \(extra_head\.weight\)",
        "reshape": r"weights of other shapes: (size mismatch for [\w.]*linear_1\.bias|named in)",
    }[change]
    if change == "drop":
        del state[key]
    elif change == "extra":
        state["extra_head.weight"] = torch.zeros(2, 2)
    else:
        state[key] = state[key][:-1].clone()
    save_file(state, weights, metadata={"format": "pt"})
    # as if saved by another release (one reason a load misses weights): the error says which
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "transformers_version": "9.0.0"}))
    release = rf"saved by transformers 9\.0\.0, this is {re.escape(transformers.__version__)}"
    with pytest.raises(
        ValueError, match=rf"teacher_model_path {saved}: .*{expected}.*partly random.*{release}"
    ):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, [], tmp_path / "run",
                 teacher_model_path=str(saved))  # fmt: skip


def test_k_options_are_checked_against_the_vocabulary_before_training(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    with pytest.raises(ValueError, match="--fixed_k 700 exceeds the distilled vocabulary of 600"):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, [], tmp_path,
                 teacher=copy.deepcopy(hf_teacher), k_mode="fixed", fixed_k=700)  # fmt: skip


def test_frozen_student_vision_skips_the_switch_pass(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path, caplog
):
    student = copy.deepcopy(hf_student)
    adapter_for(student).vision_module.requires_grad_(False)
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        trainer = make_trainer(
            student,
            tiny_tokenizer,
            [make_host_batch(student, tiny_tokenizer)],
            tmp_path,
            teacher=copy.deepcopy(hf_teacher),
        )
    assert "no trainable parameter" in caplog.text and not trainer._engine.run_switch
    trainer.train()
    assert all("vsd" not in entry for entry in trainer.state.log_history)


def test_bf16_training_keeps_the_losses_in_float32(hf_student, hf_teacher, tiny_tokenizer,
                                                   tmp_path):  # fmt: skip
    """--bf16: the teacher follows the training dtype, the distillation terms stay float32."""
    student = copy.deepcopy(hf_student)
    batches = [make_host_batch(student, tiny_tokenizer, n=2, seed=s) for s in range(2)]
    teacher = copy.deepcopy(hf_teacher)
    trainer = make_trainer(student, tiny_tokenizer, batches, tmp_path, teacher=teacher,
                       training={"bf16": True, "max_steps": 2})  # fmt: skip
    assert next(trainer.teacher.parameters()).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = trainer._engine(batches[0])
    assert terms.align.dtype == terms.vsd.dtype == terms.ce.dtype == torch.float32
    # The student runs under the Trainer's autocast, as with --distill none: bf16 Linear outputs
    # (its decoder's last attention output here; the loss stage's logits: test_loss_stage.py).
    seen = []
    last_linear = [m for n, m in student.named_modules() if n.endswith("o_proj")][-1]
    hook = last_linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    trainer.train()
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    # The host's forward again (or accelerate's autocast wrapper of it), not the engine's lambda.
    assert student.forward.__name__ != "<lambda>"
    logs = [entry for entry in trainer.state.log_history if "ce" in entry]
    assert logs and all(torch.isfinite(torch.tensor(e["total"])) for e in logs)


def test_data_parallel_and_replicate_without_zero3_or_fsdp2_are_refused(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    batches = [make_host_batch(hf_student, tiny_tokenizer)]
    with pytest.raises(
        ValueError, match="--teacher_zero3 replicate applies under DeepSpeed ZeRO-3"
    ):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path,
                 teacher=copy.deepcopy(hf_teacher), teacher_zero3="replicate")  # fmt: skip
    with pytest.raises(ValueError, match="--teacher_fsdp replicate applies under FSDP2 only"):
        make_trainer(copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path,
                 teacher=copy.deepcopy(hf_teacher), teacher_fsdp="replicate")  # fmt: skip
    args = training_args(tmp_path)
    args._n_gpu = 2  # what TrainingArguments finds with 2 visible GPUs and no launcher
    with pytest.raises(ValueError, match=r"nn.DataParallel.*torchrun --nproc_per_node N"):
        SwitchKDTrainer(
            model=copy.deepcopy(hf_student),
            args=args,
            switchkd_args=SwitchKDArguments(distill="switchkd", teacher_model_path="given"),
            teacher_model=copy.deepcopy(hf_teacher),
            teacher_tokenizer=tiny_tokenizer,
            **{TOKENIZER_KWARG: tiny_tokenizer},
        )


def test_evaluation_reports_the_mean_over_response_tokens(models, tiny_tokenizer, tmp_path):
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=3)
    trainer = make_trainer(student, tiny_tokenizer, [batch], tmp_path, teacher=teacher, w_align=0.0,
                       w_vsd=0.0, training={"gradient_accumulation_steps": 4})  # fmt: skip
    trainer.eval_dataset = Batches([batch])
    metrics = trainer.evaluate()
    with torch.no_grad():
        expected = student(**batch).loss.item()
    assert_close(
        torch.tensor(metrics["eval_loss"]),
        torch.tensor(expected),
        terms=int((batch["labels"] != IGNORE_INDEX).sum()),
        name="eval_loss",
    )


def test_evaluation_reports_token_weighted_term_means(hf_student, hf_teacher, tiny_tokenizer,
                                                      tmp_path):  # fmt: skip
    student = copy.deepcopy(hf_student).eval()
    batches = [make_host_batch(student, tiny_tokenizer, n=n, seed=n) for n in (1, 3)]
    trainer = make_trainer(student, tiny_tokenizer, batches, tmp_path, teacher=hf_teacher,
                       training={"per_device_eval_batch_size": 1})  # fmt: skip
    trainer.eval_dataset = Batches(batches)
    metrics = trainer.evaluate()
    with torch.no_grad():
        terms = [trainer._engine(batch) for batch in batches]
    tokens = sum(t.response_tokens for t in terms)
    for name in ("ce", "align", "vsd"):
        expected = sum(getattr(t, name).item() for t in terms) / tokens
        assert metrics[f"eval_{name}"] == pytest.approx(expected, rel=1e-5), name
    assert metrics["eval_distilled_tokens"] == tokens


@pytest.fixture
def restored_environ():
    """TrainingArguments hand --fsdp / --torch_compile to accelerate through os.environ."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


FSDP_REQUESTS = {  # id: (Trainer flags, what `accelerate launch` would export)
    "fsdp1-flags": ({"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 1}}, {}),
    "fsdp1-accelerate": ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}),
    "fsdp2-accelerate": ({}, {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}),
}


@pytest.mark.parametrize("how", sorted(FSDP_REQUESTS))
def test_fsdp1_and_fsdp2_on_old_releases_are_refused_naming_the_fix(
    hf_student, tiny_tokenizer, tmp_path, restored_environ, how
):
    """FSDP1 is refused naming FSDP2 (docs/fsdp.md says why); FSDP2 on a transformers whose
    Trainer hands the optimizer unsharded parameters is refused naming the release needed.
    On one process: the host Trainer refuses FSDP there, without naming a way out."""
    training, environ = FSDP_REQUESTS[how]
    if how == "fsdp2-accelerate":
        if Version(transformers.__version__) >= Version(FSDP2_TRANSFORMERS):
            pytest.skip(f"transformers {transformers.__version__} runs FSDP2 (test_trainer_dp)")
        expected = rf"needs transformers >= {re.escape(FSDP2_TRANSFORMERS)}"
    else:
        expected = r"supports FSDP2 only.*FSDP1.*fsdp_version.*2"
    os.environ.update(environ)
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2)]
    with pytest.raises(ValueError, match=expected):
        make_trainer(
            copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, w_align=0.0,
            w_vsd=0.0, training=training,
        )  # fmt: skip


def test_torch_compile_warns_once_that_it_compiles_nothing_the_engine_runs(
    hf_student, tiny_tokenizer, tmp_path, restored_environ, caplog
):
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2)]
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        make_trainer(
            copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, w_align=0.0,
            w_vsd=0.0, training={"torch_compile": True},
        )  # fmt: skip
    assert caplog.text.count("--torch_compile has no effect") == 1
