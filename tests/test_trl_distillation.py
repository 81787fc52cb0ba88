"""Switch-KD on TRL's `DistillationTrainer` (`switchkd_trainer_class(trl.DistillationTrainer)`):
TRL's prompt handling and on-policy generation, the Switch-KD objective in place of its
divergence, on tiny offline Qwen2.5-VL models and a processor built offline.

The reference of a step is built here independently of TRL: each prompt rendered and tokenised
by hand, generated from alone (no padding), the batch assembled by hand, then the off-policy
Switch-KD step with `w_ce` 0 on it (`SwitchKDTrainer`).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers

from switchkd_plugin import SwitchKDArguments, SwitchKDTrainerMixin, switchkd_trainer_class
from switchkd_plugin.testing import IGNORE_INDEX, student_spec, teacher_spec
from switchkd_plugin.testing import qwen_vl as qwen
from switchkd_plugin.testing.trainer import assert_same_step, make_trainer
from switchkd_plugin.training.distillation_host import completion_batch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[trl]')")
if not hasattr(trl, "DistillationTrainer"):
    pytest.skip(f"trl {trl.__version__} has no DistillationTrainer", allow_module_level=True)
if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
    pytest.skip(
        f"transformers {transformers.__version__} has no Qwen2.5-VL", allow_module_level=True
    )

datasets = pytest.importorskip("datasets")

MAX_NEW = 5
# One image and question per sample, of different lengths: TRL left-pads the prompts. (A batch
# mixing text-only and image prompts fails inside TRL 1.16's own processor call, without us.)
QUESTIONS = ("what colour is the circle on the left?", "how many shapes?")


# ----------------------------------------------------------------------------- reference


def _prompt_text(question: str) -> str:
    """The chat template's rendering of a user turn with its image (16 merged tokens) and the
    assistant's opening, by hand."""
    image = qwen.VISION_START + qwen.IMAGE_PAD * 16 + qwen.VISION_END
    return f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"


def _generated_alone(student, tokenizer, images, eos: list[int]) -> list[dict]:
    """Each sample's prompt tokens, image inputs and greedy response, generated from alone."""
    image_processor = qwen.build_image_processor()
    model = copy.deepcopy(student).eval()
    image_id = tokenizer.convert_tokens_to_ids(qwen.IMAGE_PAD)
    samples = []
    for question, image in zip(QUESTIONS, images, strict=True):
        ids = tokenizer(_prompt_text(question)).input_ids
        pixels = image_processor([image], return_tensors="pt")
        prompt = torch.tensor([ids])
        inputs = {
            "input_ids": prompt,
            "attention_mask": torch.ones_like(prompt),
            "mm_token_type_ids": (prompt == image_id).long(),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
            )  # fmt: skip
        new = out[0, len(ids) :].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        samples.append({**inputs, "response": new[: ends[0] + 1] if ends else new})
    return samples


def _by_hand(samples: list[dict], pad: int) -> dict:
    """Prompt + response per sample, right-padded, the response supervised."""
    rows = [s["input_ids"][0].tolist() + s["response"] for s in samples]
    width = max(map(len, rows))

    def padded(row: list[int], value: int) -> list[int]:
        return row + [value] * (width - len(row))

    labels = [[IGNORE_INDEX] * s["input_ids"].shape[1] + s["response"] for s in samples]
    types = [s["mm_token_type_ids"][0].tolist() + [0] * len(s["response"]) for s in samples]
    return {
        "input_ids": torch.tensor([padded(r, pad) for r in rows]),
        "attention_mask": torch.tensor([padded([1] * len(r), 0) for r in rows]),
        "labels": torch.tensor([padded(r, IGNORE_INDEX) for r in labels]),
        "mm_token_type_ids": torch.tensor([padded(t, 0) for t in types]),
        "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
        "image_grid_thw": torch.cat([s["image_grid_thw"] for s in samples]),
    }


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def models():
    tokenizer = qwen.build_qwen_vl_tokenizer()
    student = qwen.build_qwen_vl("qwen2_5_vl", student_spec(), tokenizer)
    teacher = qwen.build_qwen_vl("qwen2_5_vl", teacher_spec(), tokenizer).requires_grad_(False)
    return student, teacher.eval(), tokenizer


def _processor(tokenizer, padding_side: str = "left"):
    processor = qwen.build_processor("qwen2_5_vl", copy.deepcopy(tokenizer))
    processor.tokenizer.padding_side = padding_side
    return processor


def _dataset(images) -> datasets.Dataset:
    """TRL's prompt-only vision format: a conversational `prompt` and its `images`."""
    prompts = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        for q in QUESTIONS
    ]
    return datasets.Dataset.from_dict({"prompt": prompts, "images": [[i] for i in images]})


def _config(output_dir, **overrides) -> trl.DistillationConfig:
    """One step of plain SGD, as `testing.trainer.training_args`, greedy generation."""
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=1,
        learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
        seed=0, disable_tqdm=True, bf16=False, gradient_checkpointing=False,
        max_completion_length=MAX_NEW, generation_kwargs={"do_sample": False},
    )  # fmt: skip
    options.update(overrides)
    return trl.DistillationConfig(**options)


def _trainer(student, teacher, tokenizer, dataset, config, processor=None, **switchkd):
    return switchkd_trainer_class(trl.DistillationTrainer)(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=processor or _processor(tokenizer),
        teacher_tokenizer=tokenizer,
        switchkd_args=SwitchKDArguments(
            **{"distill": "switchkd", "teacher_model_path": "given-as-object", **switchkd}
        ),
    )


def _eos_ending_sample_0_early(student, tokenizer, images) -> int:
    """A token sample 0's greedy response reaches before `MAX_NEW` and sample 1's never
    contains: as an EOS, sample 0 stops there and sample 1 runs to `max_completion_length`."""
    free = _generated_alone(student, tokenizer, images, eos=[tokenizer.eos_token_id])
    first, other = free[0]["response"], set(free[1]["response"])
    for position, token in enumerate(first[: MAX_NEW - 1]):
        if token not in first[:position] and token not in other:
            return token
    raise AssertionError(f"no token ends sample 0 alone in {free}: pick other questions")


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("accumulation", [1, 2], ids=["batch2", "2x1_accumulated"])
def test_step_equals_generate_alone_then_the_off_policy_step(models, tmp_path, accumulation):
    """Greedy: TRL's generation (prompts left-padded together) + the repacked batch + Switch-KD
    equals generating each prompt alone and taking the off-policy step with `w_ce` 0 on the
    batch built by hand. Sample 0 stops at an EOS (kept, supervised), sample 1 runs to
    `max_completion_length`. Accumulating two micro-batches of one takes the same step (TRL's
    count of the window's completion tokens normalises both)."""
    student, teacher, tokenizer = models
    student = copy.deepcopy(student)
    images = qwen.make_images(len(QUESTIONS), seed=4)
    stop = _eos_ending_sample_0_early(student, tokenizer, images)
    student.generation_config.eos_token_id = stop  # TRL adds the tokenizer's own EOS
    eos = [tokenizer.eos_token_id, stop]
    samples = _generated_alone(student, tokenizer, images, eos)
    assert samples[0]["response"][-1] == stop and len(samples[0]["response"]) < MAX_NEW
    assert len(samples[1]["response"]) == MAX_NEW
    expected = _by_hand(samples, tokenizer.pad_token_id)

    config = _config(
        tmp_path / "trl",
        per_device_train_batch_size=2 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    trainer = _trainer(copy.deepcopy(student), teacher, tokenizer, _dataset(images), config)
    trainer.train()
    reference = make_trainer(
        copy.deepcopy(student), tokenizer, [expected], tmp_path / "ref", teacher=teacher,
        w_ce=0.0,
    )  # fmt: skip
    reference.train()
    assert_same_step(trainer.model.state_dict(), reference.model.state_dict(), student.state_dict())
    logged = next(entry for entry in trainer.state.log_history if "total" in entry)
    assert logged["total"] == pytest.approx(reference.state.log_history[0]["total"], rel=1e-5)
    assert logged["completions/max_length"] == MAX_NEW  # TRL's own logs are kept


def test_distill_none_leaves_trls_own_divergence(models, tmp_path):
    """`--distill none`: the DistillationTrainer as TRL ships it (its JSD; no Switch-KD terms)."""
    student, _, tokenizer = models
    images = qwen.make_images(len(QUESTIONS), seed=4)
    trainer = switchkd_trainer_class(trl.DistillationTrainer)(
        model=copy.deepcopy(student),
        teacher_model=copy.deepcopy(models[1]),
        args=_config(tmp_path),
        train_dataset=_dataset(images),
        processing_class=_processor(tokenizer),
    )
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "entropy" in logged and "align" not in logged and math.isfinite(logged["loss"])


def test_completion_batch_packs_prompt_then_completion_right_padded():
    """Left-padded prompts and right-padded completions -> each row's prompt then completion,
    right-padded; labels on the completion only; per-token keys moved alike; images as is."""
    inputs = {
        "prompt_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
        "prompt_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        "completion_ids": torch.tensor([[11, 12, 13], [14, 0, 0]]),
        "completion_mask": torch.tensor([[1, 1, 1], [1, 0, 0]]),
        "mm_token_type_ids": torch.tensor([[0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]]),
        "pixel_values": torch.ones(3, 2),
        "num_items_in_batch": torch.tensor(4),
        "num_images": [1, 1],
    }
    batch = completion_batch(inputs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 11, 12, 13], [7, 8, 9, 10, 14]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, 11, 12, 13],
        [IGNORE_INDEX] * 4 + [14],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1] * 5]
    assert batch["mm_token_type_ids"].tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert batch["pixel_values"] is inputs["pixel_values"]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "mm_token_type_ids"} | {
        "pixel_values"
    }

    inputs["completion_mask"] = torch.tensor([[1, 0, 0], [1, 0, 0]])  # sample 0 stops early
    batch = completion_batch(inputs, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 11, 0, 0], [7, 8, 9, 10, 14]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 11] + [IGNORE_INDEX] * 2


@pytest.mark.parametrize(
    ("switchkd", "config", "message"),
    [
        ({"lmbda": 0.5}, {}, r"--lmbda: trl\.DistillationTrainer generates every batch"),
        ({"max_new_tokens": 8, "top_p": 0.9}, {}, r"--max_new_tokens, --top_p: .*max_comp"),
        ({}, {"beta": 0.5}, r"DistillationConfig\(beta=0\.5\) selects TRL's divergence"),
    ],
)
def test_flags_this_host_does_not_take_are_refused_by_name(
    models, tmp_path, switchkd, config, message
):
    student, teacher, tokenizer = models
    dataset = _dataset(qwen.make_images(len(QUESTIONS)))
    with pytest.raises(ValueError, match=message):
        _trainer(student, teacher, tokenizer, dataset, _config(tmp_path, **config), **switchkd)


def test_right_padding_processor_is_refused_with_the_fix(models, tmp_path):
    """TRL renders the prompts' image inputs with the processor's padding: on the right they
    would not line up with its left-padded prompt ids."""
    student, teacher, tokenizer = models
    dataset = _dataset(qwen.make_images(len(QUESTIONS)))
    with pytest.raises(ValueError, match=r"padding_side = 'left'"):
        _trainer(
            student, teacher, tokenizer, dataset, _config(tmp_path),
            processor=_processor(tokenizer, padding_side="right"),
        )  # fmt: skip


def test_tools_and_hand_built_classes_are_refused_by_name(models, tmp_path):
    student, teacher, _ = models
    dataset = _dataset(qwen.make_images(len(QUESTIONS)))

    def tool(x: int) -> int:
        """Adds one.

        Args:
            x: a number.
        """
        return x + 1

    with pytest.raises(NotImplementedError, match=r"tools= .* not supported yet"):
        switchkd_trainer_class(trl.DistillationTrainer)(
            model=student, teacher_model=teacher, args=_config(tmp_path), tools=[tool],
            train_dataset=dataset,
            switchkd_args=SwitchKDArguments(distill="switchkd", teacher_model_path="given"),
        )  # fmt: skip
    by_hand = type("ByHand", (SwitchKDTrainerMixin, trl.DistillationTrainer), {})
    with pytest.raises(NotImplementedError, match=r"switchkd_trainer_class\(trl\.Distillation"):
        by_hand(model=student, args=_config(tmp_path))


@pytest.mark.parametrize("stage", [None, 3], ids=["ddp-2", "zero3-2"])
def test_two_ranks_take_the_one_rank_step(models, tmp_path, stage):
    """One prompt per rank (each generated alone, greedy), DDP or ZeRO-3 with the teacher
    sharded: the step of one rank on both prompts. TRL's count of the window's completion
    tokens is over every rank already; counting it again would halve the step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_trainer_dp import HAS_DEEPSPEED, NO_SHM, OLD_ZERO3, _deepspeed_config

    if stage is not None and (not HAS_DEEPSPEED or OLD_ZERO3):
        pytest.skip("needs deepspeed with ZeRO-3 Switch-KD (pip install -e '.[deepspeed]')")
    student, teacher, tokenizer = models
    images = qwen.make_images(len(QUESTIONS), seed=4)
    one = _trainer(
        copy.deepcopy(student), teacher, tokenizer, _dataset(images), _config(tmp_path / "one")
    )
    one.train()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    config = ""
    if stage is not None:
        config = str(_deepspeed_config(stage, tmp_path))
        env["PYTHONPATH"] = os.pathsep.join([str(NO_SHM), os.environ.get("PYTHONPATH", "")])
    worker = Path(__file__).with_name("_distillation_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launch, str(worker), str(tmp_path / "two"), config], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = type(student).from_pretrained(tmp_path / "two").state_dict()
    assert_same_step(after, one.model.state_dict(), student.state_dict())
