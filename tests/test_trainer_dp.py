"""Data parallelism and DeepSpeed: every layout of the same two micro-batches takes the same step.

1 rank accumulating 2 micro-batches (plain, ZeRO-2, ZeRO-3) and 2 ranks with 1 micro-batch each
(DDP over gloo, ZeRO-2, ZeRO-3) must all move the student exactly like the plain 1-rank run: this
checks the token normaliser, the forward redirection through the wrapper, the ZeRO-3 teacher,
and a micro-batch without any response token.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from switchkd_plugin.testing.trainer import assert_same_step
from switchkd_plugin.training.distributed import ZERO3_EVAL_BACKWARD_DEEPSPEED
from switchkd_plugin.training.resume import SETTINGS_FILE

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_dp_worker.py")
RESUME_WORKER = Path(__file__).with_name("_fsdp_resume_worker.py")
NO_SHM = Path(__file__).with_name("deepspeed_no_shm")  # skips a 40-60 s JIT build per environment
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
# Older DeepSpeed refuses ZeRO-3 backward through the eval-mode teacher: the trainer says so.
OLD_ZERO3 = HAS_DEEPSPEED and Version(version("deepspeed")) < Version(ZERO3_EVAL_BACKWARD_DEEPSPEED)


def _deepspeed_config(stage: int, tmp_path: Path) -> Path:
    """The shipped config; the bucket sizes it leaves on "auto" (sized from the model's
    `hidden_size`, which a LlavaConfig lacks) become integers."""
    config = json.loads((ROOT / "configs" / f"zero{stage}.json").read_text())
    assert config["gradient_clipping"] == "auto"  # else DeepSpeed clips at 1.0 whatever the flags
    for key, value in config["zero_optimization"].items():
        if value == "auto":
            config["zero_optimization"][key] = 100_000
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(config))
    return path


def _run(
    tmp_path: Path,
    processes: int,
    stage: int | None,
    mode: str | None = None,
    teacher: str = "shard",
    family: str = "hf_llava",
    teacher_checkpointing: bool = False,
    text_only: bool = False,
    find_unused: bool = True,
    refused: str | None = None,
    onpolicy: bool = False,
    fsdp: int | None = None,
    bf16: bool = False,
    lora: bool = False,
    evaluate: bool = False,
) -> dict[str, torch.Tensor] | str:
    """The student's weights after one step of `_dp_worker.py` (`family`: hf_llava, qwen2_5_vl,
    qwen3_vl; `teacher`: --teacher_zero3, or --teacher_fsdp with `fsdp`=2, the Trainer's FSDP2
    set up on CPU ranks by `switchkd_plugin.testing.fsdp`; `bf16`: --bf16; `lora`: a LoRA
    student, its adapters returned; `text_only`: the second micro-batch has no image;
    `onpolicy`: `--lmbda 1`, greedy responses; `evaluate`: after the step, `evaluate()` on the
    micro-batches (one per rank), its metrics in `eval_metrics.json`; `find_unused` False: DDP's
    find_unused_parameters off, the parameters the host never uses frozen); on DeepSpeed <
    0.15.4 under ZeRO-3, the run's output, which must hold the trainer's refusal."""
    layout = f"fsdp{fsdp}" if fsdp else f"zero{stage}"
    out = tmp_path / f"{processes}-ranks-{layout}-{teacher}"
    out.mkdir(parents=True)
    mode = mode or ("split" if processes > 1 else "accumulate")
    config = "" if stage is None else str(_deepspeed_config(stage, tmp_path))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["SWITCHKD_TEST_FAMILY"] = family
    env["SWITCHKD_TEST_TEACHER_CHECKPOINTING"] = str(int(teacher_checkpointing))
    env["SWITCHKD_TEST_TEXT_ONLY"] = str(int(text_only))
    env["SWITCHKD_TEST_FIND_UNUSED"] = str(int(find_unused))
    env["SWITCHKD_TEST_ONPOLICY"] = str(int(onpolicy))
    env["SWITCHKD_TEST_FSDP"] = "" if fsdp is None else str(fsdp)
    env["SWITCHKD_TEST_BF16"] = str(int(bf16))
    env["SWITCHKD_TEST_LORA"] = str(int(lora))
    env["SWITCHKD_TEST_EVALUATE"] = str(int(evaluate))
    if stage is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(NO_SHM), os.environ.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", str(WORKER), str(out), mode, config,
               teacher]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout[-3000:] + result.stderr[-3000:]
    if stage == 3 and OLD_ZERO3:
        refused = f"deepspeed>={ZERO3_EVAL_BACKWARD_DEEPSPEED}"
    if refused is not None:
        assert result.returncode != 0 and refused in log, log
        return log
    assert result.returncode == 0, log
    assert (out / SETTINGS_FILE).is_file(), f"the writing rank saved no Switch-KD settings\n{log}"
    if lora:
        return load_file(str(out / "adapter_model.safetensors"))
    model_class = transformers.AutoConfig.from_pretrained(str(out)).architectures[0]
    return getattr(transformers, model_class).from_pretrained(str(out)).state_dict()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    return _run(tmp_path_factory.mktemp("reference"), 1, None, evaluate=True)


@pytest.fixture(scope="module")
def reference_eval(reference, tmp_path_factory) -> dict[str, float]:
    """The reference run's evaluation metrics (after its step)."""
    root = tmp_path_factory.getbasetemp()
    return json.loads(next(root.glob("reference*/1-ranks-*/eval_metrics.json")).read_text())


def _assert_same_evaluation(tmp_path: Path, expected: dict[str, float]) -> None:
    """A layout's `evaluate()` after the step reports the 1-rank metrics: token-weighted term
    means summed over the ranks, the rank without response tokens included."""
    got = json.loads(next(tmp_path.glob("**/eval_metrics.json")).read_text())
    # The divergences are small differences of per-token log-probabilities of the size of the
    # CE: float32 rounding there is relative to the CE, not to the divergence itself.
    scale = 1e-5 * abs(expected["eval_ce"])
    for name in ("eval_loss", "eval_ce", "eval_align", "eval_vsd", "eval_distilled_tokens"):
        close = pytest.approx(expected[name], rel=1e-5, abs=scale)
        assert got[name] == close, (name, got[name], expected[name])


@pytest.mark.parametrize(
    ("processes", "stage", "teacher_zero3"),
    [(2, None, "shard"), (1, 2, "shard"), (2, 2, "shard"), (1, 3, "shard"), (2, 3, "shard"),
     (2, 3, "replicate")],
    ids=["ddp-2", "zero2-1", "zero2-2", "zero3-1", "zero3-2", "zero3-2-replicated-teacher"],
)  # fmt: skip
def test_layouts_take_the_same_step(
    tmp_path, reference, reference_eval, processes, stage, teacher_zero3
):
    """The first micro-batch has no response token (untied lm_head): the rank that takes it
    still calls every lm_head and runs the switch pass, as the other does (DDP and ZeRO-2
    reduce every parameter's gradient, ZeRO-3 gathers collectively; skipping them deadlocks or
    fails the run), and the two ranks need different numbers of lm_head chunks. Evaluating
    afterwards gives the 1-rank metrics."""
    if stage is not None and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    after = _run(tmp_path, processes, stage, teacher=teacher_zero3, evaluate=True)
    if isinstance(after, str):
        pytest.skip(f"deepspeed {version('deepspeed')}: ZeRO-3 Switch-KD refused, as it must be")
    assert_same_step(after, reference, _initial_weights())
    _assert_same_evaluation(tmp_path, reference_eval)


def _initial_weights(family: str = "hf_llava") -> dict[str, torch.Tensor]:
    from switchkd_plugin.testing import build_hf_llava, build_tokenizer, qwen_vl, student_spec

    if family == "hf_llava":
        return build_hf_llava(student_spec(), build_tokenizer()).state_dict()
    from switchkd_plugin.testing import families, teacher_spec

    if family in families.FAMILIES:  # as _dp_worker builds them: the teacher's vision depth
        spec = student_spec(vision_layers=teacher_spec().vision_layers)
        tokenizer = families.build_family_tokenizer(family)
        return families.build_family_model(family, spec, tokenizer).state_dict()
    tokenizer = qwen_vl.build_qwen_vl_tokenizer()
    return qwen_vl.build_qwen_vl(family, student_spec(), tokenizer).state_dict()


def test_sharded_teacher_runs_one_prefetchable_trace_per_step(tmp_path):
    """ZeRO-3 prefetches a sharded teacher's parameters only once its coordinator holds a
    complete trace: one call of the teacher's root module per step, the same calls each step
    (the per-layer checkpointing's recomputes and the chunked loss stage included)."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    if OLD_ZERO3:
        pytest.skip(f"deepspeed {version('deepspeed')}: ZeRO-3 Switch-KD is refused")
    _run(tmp_path, 2, 3, mode="split-3-steps", teacher_checkpointing=True)
    trace = (tmp_path / "2-ranks-zero3-shard" / "teacher_trace.txt").read_text()
    assert trace == "complete", trace


TEXT_ONLY_LAYOUTS = {  # id: (family, DeepSpeed stage, DDP's find_unused_parameters)
    "ddp": ("hf_llava", None, True),
    "ddp-no-unused": ("hf_llava", None, False),
    "zero3": ("hf_llava", 3, True),
    "zero3-qwen2_5_vl": ("qwen2_5_vl", 3, True),
    # Each family's own image path (packing, pixel shuffle, token types) on the rank with images
    # against the placeholder on the text-only one: the same parameter reads and gathers.
    "zero3-gemma3": ("gemma3", 3, True),
    "zero3-internvl": ("internvl", 3, True),
    "zero3-llava_onevision": ("llava_onevision", 3, True),
    "zero3-smolvlm": ("smolvlm", 3, True),
}


@pytest.mark.parametrize("layout", sorted(TEXT_ONLY_LAYOUTS))
def test_a_text_only_rank_takes_the_one_rank_step(tmp_path, layout):
    """2 ranks: one rank's micro-batch is text-only (no pixel_values), the other's has images
    and runs the switch pass. The ranks agree that it runs (the text-only rank runs it on one
    sample, distilling nothing), and the text-only rank runs both vision encoders and
    connectors on a placeholder image tied in with weight 0, so that the ranks make the same
    module calls: ZeRO-3 (the teacher sharded) gathers alike instead of deadlocking, DDP
    without find_unused_parameters reduces every gradient. The step equals 1 rank accumulating
    both micro-batches."""
    family, stage, find_unused = TEXT_ONLY_LAYOUTS[layout]
    if stage is not None and (not HAS_DEEPSPEED or OLD_ZERO3):
        pytest.skip("needs deepspeed >= 0.15.4 (pip install -e '.[deepspeed]')")
    if family != "hf_llava" and not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")
    from switchkd_plugin.testing.families import FAMILIES, family_skip_reason

    if family in FAMILIES and (reason := family_skip_reason(family)):
        pytest.skip(reason)
    options = dict(family=family, text_only=True, find_unused=find_unused)
    reference = _run(tmp_path / "one", 1, None, **options)
    after = _run(tmp_path / "two", 2, stage, **options)
    assert_same_step(after, reference, _initial_weights(family))


@pytest.mark.parametrize(
    ("stage", "mode"),
    [(None, "split-nan"), (None, "split-nan-checkpointed"), (2, "split-nan")],
    ids=["ddp-2", "ddp-2-checkpointed", "zero2-2"],
)
def test_a_step_skipped_on_one_rank_is_skipped_on_all(tmp_path, stage, mode):
    """One rank's micro-batch is NaN: both ranks skip it (the decision is all-reduced), so under
    DDP the step makes no AdamW step and the next one equals a first step: DDP's reducer, with or
    without find_unused_parameters, got the gradients it waits for. Under ZeRO-2 DeepSpeed's
    engine steps inside backward, out of the trainer's reach: its zero-gradient step is applied
    and only reported (README)."""
    if stage is not None and not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    # Checkpointed, DDP runs without find_unused_parameters: what the host never uses is frozen.
    options = dict(mode=mode, find_unused=not mode.endswith("-checkpointed"))
    after = _run(tmp_path, 2, stage, **options)
    (tmp_path / "clean").mkdir()
    options["mode"] = mode.replace("split-nan", "split-adamw")
    clean = _run(tmp_path / "clean", 2, stage, **options)
    out = next(tmp_path.glob("2-ranks-*"))
    logs = json.loads((out / "log_history.json").read_text())
    skipped = [(e["nonfinite_skipped"], e["nonfinite_skipped_steps"]) for e in logs if "loss" in e]
    if stage is None:
        assert skipped == [(1, 1), (0, 0)]
        assert_same_step(after, clean, _initial_weights())
    else:
        assert skipped == [(1, 0), (0, 0)]
        assert not all(torch.equal(after[name], value) for name, value in clean.items())


def test_ddp_without_find_unused_refuses_a_student_with_unreached_parameters(tmp_path):
    """Gradient checkpointing turns DDP's find_unused_parameters off; the tiny SigLIP's last
    layer and head (past vision_feature_layer) get no gradient, so DDP would leave their
    buckets, the rest of the vision tower included, unaveraged and stop at the next step. The
    run stops after the first backward, before any optimizer step, naming the fix."""
    _run(
        tmp_path,
        2,
        None,
        mode="split-adamw-checkpointed",
        refused="--ddp_find_unused_parameters True",
    )


@pytest.mark.parametrize("layout", ["ddp-2", "zero3-2", "fsdp2-2"])
def test_onpolicy_ranks_take_the_one_rank_step(tmp_path, layout):
    """`--lmbda 1`, greedy: each rank generates its own micro-batch's responses (padded on the
    rank; the ranks stop generating at different lengths: under ZeRO-3 with the student's
    parameters gathered, under FSDP2 in step with the sharded student, a forward per token on
    every rank until all are done) and the step equals 1 rank accumulating both micro-batches.
    """
    stage = 3 if layout == "zero3-2" else None
    if stage is not None and (not HAS_DEEPSPEED or OLD_ZERO3):
        pytest.skip("needs deepspeed >= 0.15.4 (pip install -e '.[deepspeed]')")
    if layout == "fsdp2-2" and not FSDP2_TRAINER:
        pytest.skip(f"transformers {transformers.__version__}: no FSDP2 from the Trainer's flags")
    reference = _run(tmp_path / "one", 1, None, onpolicy=True)
    fsdp = 2 if layout == "fsdp2-2" else None
    after = _run(tmp_path / "two", 2, stage, onpolicy=True, fsdp=fsdp)
    assert_same_step(after, reference, _initial_weights())
    logs = json.loads(next((tmp_path / "two").glob("2-ranks-*/log_history.json")).read_text())
    assert [e["onpolicy_batches"] for e in logs if "loss" in e] == [1]  # per rank


# ------------------------------------------------------------------------------------- FSDP2
# The student sharded by the Trainer's own FSDP2 path (accelerate's `fsdp2_prepare_model`:
# `fully_shard` per decoder layer and vision block, the embeddings and [final norm, lm_head] in
# units of their own, then the root), the teacher sharded with `fully_shard` or replicated.
# How this differs from a GPU run: accelerate sets FSDP up on accelerator ranks only (on CPU
# ranks it falls back to DDP without a word), so the test Trainer (`switchkd_plugin.testing.
# fsdp`) puts the FSDP2 plugin the Trainer built from `--fsdp "full_shard auto_wrap"
# --fsdp_config '{"fsdp_version": 2}'` back into accelerate's state; from there the Trainer and
# accelerate run their GPU code. gloo instead of NCCL, no CUDA streams to overlap, CPU autocast.

FSDP2_TRAINER = Version(transformers.__version__).major >= 5
needs_fsdp2_trainer = pytest.mark.skipif(
    not FSDP2_TRAINER,
    reason=f"transformers {transformers.__version__}: its Trainer does not build FSDP2 from "
    "--fsdp_config (transformers 5.x does); Switch-KD refuses the FSDP1 it would set up, "
    "naming FSDP2 (test_trainer.py::test_fsdp1_and_fsdp2_on_old_releases_are_refused_naming_"
    "the_fix)",
)


FSDP2_LAYOUTS = {  # id: (family, --teacher_fsdp, per-layer teacher checkpointing, text-only rank)
    "llava-teacher-sharded-checkpointed": ("hf_llava", "shard", True, False),
    "llava-teacher-replicated": ("hf_llava", "replicate", False, False),
    "qwen2_5_vl-teacher-sharded-text-only-rank": ("qwen2_5_vl", "shard", False, True),
}


@needs_fsdp2_trainer
@pytest.mark.parametrize("layout", sorted(FSDP2_LAYOUTS))
def test_fsdp2_takes_the_one_rank_step(tmp_path, reference, reference_eval, layout):
    """2 ranks under FSDP2 take the step of 1 rank accumulating both micro-batches. The first
    micro-batch has no response token (untied lm_head, chunks of 16 rows): the rank that takes
    it still runs every FSDP unit the other runs (each gathers collectively), the ranks agree
    on the number of lm_head chunks, and the student's lm_head is gathered once for them all.
    Text-only rank: its micro-batch has no image, so both models' vision blocks run on a
    placeholder image (weight 0), as the other rank's do on its images. Evaluating afterwards
    (the sharded models in eval mode) gives the 1-rank metrics."""
    family, teacher, checkpointing, text_only = FSDP2_LAYOUTS[layout]
    if family != "hf_llava" and not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")
    options = dict(family=family, text_only=text_only, evaluate=True)
    expected, expected_eval = reference, reference_eval
    if options != dict(family="hf_llava", text_only=False, evaluate=True):
        expected = _run(tmp_path / "one", 1, None, **options)
        expected_eval = json.loads(next((tmp_path / "one").glob("*/eval_metrics.json")).read_text())
    after = _run(tmp_path / "two", 2, None, fsdp=2, teacher=teacher,
                 teacher_checkpointing=checkpointing, **options)  # fmt: skip
    assert_same_step(after, expected, _initial_weights(family))
    _assert_same_evaluation(tmp_path / "two", expected_eval)


@needs_fsdp2_trainer
def test_fsdp2_accumulation_equals_one_big_batch(tmp_path):
    """2 ranks accumulating 2 micro-batches each under FSDP2 (accelerate defers the gradient
    reduce-scatter to the last micro-batch; the student's lm_head gradients accumulate unsharded
    in between) take the step of 1 rank on all 4 samples at once."""
    expected = _run(tmp_path / "one", 1, None, mode="one-batch")
    after = _run(tmp_path / "two", 2, None, mode="split-accumulate", fsdp=2)
    assert_same_step(after, expected, _initial_weights())


@needs_fsdp2_trainer
def test_fsdp2_bf16_mixed_precision_takes_the_step_to_bf16_rounding(tmp_path, reference):
    """`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` with --bf16 (the teacher in
    bf16): the models compute in bf16, the loss stage's terms in float32 (`loss_stage.py`). The
    step is compared loosely with the float32 1-rank step: bf16 rounds to 2^-8 relative, so the
    whole step (every parameter's update, one vector) may differ by a few of those, not more;
    the master weights stay float32."""
    after = _run(tmp_path, 2, None, fsdp=2, bf16=True)
    before = _initial_weights()
    assert {value.dtype for value in after.values()} == {torch.float32}
    got = torch.cat([(after[name] - start).flatten() for name, start in before.items()])
    want = torch.cat([(reference[name] - start).flatten() for name, start in before.items()])
    error = float((got - want).norm() / want.norm())
    assert error < 8 * 2**-8, (
        f"the bf16 step differs from the float32 one by {error:.2e} (relative)"
    )


@needs_fsdp2_trainer
@pytest.mark.parametrize("state_dict_type", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_fsdp2_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, state_dict_type):
    """Checkpoints through the Trainer's own FSDP path (`save_fsdp_model` / `load_fsdp_model`,
    the optimizer's shards too) hold `switchkd_config.json`; the resumed run logs the same
    terms and ends on the same weights, bit for bit. The full-state checkpoint also holds a
    `model.safetensors` in LLaVA's saved key layout: the host's FSDP loader restores the
    sharded model, not Switch-KD's key-layout conversion (which loads unsharded tensors)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*launch, str(RESUME_WORKER), str(tmp_path), state_dict_type]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads((tmp_path / "result.json").read_text())
    assert outcome["settings_saved"], outcome["checkpoint"]
    assert sorted(outcome["logs"]) == ["3", "4"]
    assert outcome["resumed_logs"] == outcome["logs"]
    assert outcome["differ"] == []


@needs_fsdp2_trainer
def test_fsdp2_non_finite_micro_batch_is_skipped_on_every_rank_or_diagnosed(tmp_path):
    """--nonfinite skip: one rank's micro-batch has a NaN image; both ranks skip it (zero
    gradients to every rank's shards, outside FSDP's hooks), no optimizer step, and the next
    step equals a first step. --nonfinite error: the run stops naming where the values first go
    bad, found by running the pathways again with the FSDP2 roots gathered."""
    after = _run(tmp_path / "skip", 2, None, mode="split-nan", fsdp=2)
    clean = _run(tmp_path / "clean", 2, None, mode="split-adamw", fsdp=2)
    logs = json.loads(next((tmp_path / "skip").glob("2-ranks-*/log_history.json")).read_text())
    skipped = [(e["nonfinite_skipped"], e["nonfinite_skipped_steps"]) for e in logs if "loss" in e]
    assert skipped == [(1, 1), (0, 0)]
    assert_same_step(after, clean, _initial_weights())
    _run(tmp_path / "error", 2, None, mode="split-nan-error", fsdp=2,
         refused="first non-finite: the batch's `pixel_values`")  # fmt: skip


@needs_fsdp2_trainer
def test_fsdp2_lora_student_takes_the_one_rank_step(tmp_path):
    """A peft LoRA student (adapters on q_proj / v_proj of the LM and the vision encoder, random
    A and B) under FSDP2: frozen base weights and trainable adapters share FSDP units; the
    adapters step as on 1 rank, and the checkpoint holds the adapters only."""
    pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[peft]')")
    expected = _run(tmp_path / "one", 1, None, lora=True)
    after = _run(tmp_path / "two", 2, None, fsdp=2, lora=True)
    before = load_file(str(next((tmp_path / "one").glob("*/initial_adapters.safetensors"))))
    assert sorted(after) == sorted(before)
    assert_same_step(after, expected, before)
