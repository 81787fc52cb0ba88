"""Switch-KD on TRL's `DistillationTrainer` (`switchkd_trainer_class(trl.DistillationTrainer)`):
TRL's prompt handling and on-policy generation, the Switch-KD objective in place of its
divergence, on tiny offline Qwen2.5-VL and LLaVA models and their processors built offline.

The reference of a step is built here independently of TRL: each prompt rendered and tokenised
by hand, generated from alone (no padding), the batch assembled by hand, then the off-policy
Switch-KD step with `w_ce` 0 on it (`SwitchKDTrainer`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers

from switchkd_plugin import SwitchKDArguments, SwitchKDTrainerMixin, switchkd_trainer_class
from switchkd_plugin.testing import (
    IGNORE_INDEX,
    IMAGE_TOKEN,
    build_hf_llava,
    build_llava_processor,
    build_tokenizer,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing import qwen_vl as qwen
from switchkd_plugin.testing.generation import eos_ending_first_early
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


# ----------------------------------------------------------------------------- families


@dataclass
class Family:
    """A family's tiny student and teacher, tokenizer, processor, images, and the reference's
    own rendering of a prompt: its tokens `[1, P]`, attention mask and image inputs, by hand."""

    name: str
    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    make_processor: Callable[[transformers.PreTrainedTokenizerBase], object]
    images: list
    prompt_inputs: Callable[[str, object], dict]

    def processor(self, padding_side: str = "left"):
        processor = self.make_processor(copy.deepcopy(self.tokenizer))
        processor.tokenizer.padding_side = padding_side
        return processor


def _turn(question: str, image: str) -> str:
    """The chat template's user turn with its image placeholder, and the assistant's opening."""
    return f"<|im_start|>user\n{image}{question}<|im_end|>\n<|im_start|>assistant\n"


def _text_inputs(tokenizer, question: str) -> dict:
    """A text-only prompt: its tokens and attention mask, no image inputs."""
    ids = torch.tensor([tokenizer(_turn(question, "")).input_ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _qwen_family() -> Family:
    tokenizer = qwen.build_qwen_vl_tokenizer()
    image_processor = qwen.build_image_processor()
    image_id = tokenizer.convert_tokens_to_ids(qwen.IMAGE_PAD)

    def prompt_inputs(question: str, image) -> dict:
        if image is None:
            return _text_inputs(tokenizer, question)
        placeholder = qwen.VISION_START + qwen.IMAGE_PAD * 16 + qwen.VISION_END  # 2x2-merged
        ids = torch.tensor([tokenizer(_turn(question, placeholder)).input_ids])
        pixels = image_processor([image], return_tensors="pt")
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == image_id).long(),
            "pixel_values": pixels["pixel_values"],
            "image_grid_thw": pixels["image_grid_thw"],
        }

    return Family(
        "qwen2_5_vl",
        qwen.build_qwen_vl("qwen2_5_vl", student_spec(), tokenizer),
        qwen.build_qwen_vl("qwen2_5_vl", teacher_spec(), tokenizer),
        tokenizer,
        lambda tok: qwen.build_processor("qwen2_5_vl", tok),
        qwen.make_images(len(QUESTIONS), seed=4),
        prompt_inputs,
    )


def _llava_family() -> Family:
    tokenizer, spec = build_tokenizer(), student_spec()
    image_processor = transformers.SiglipImageProcessor(
        size={"height": spec.image_size, "width": spec.image_size}
    )

    def prompt_inputs(question: str, image) -> dict:
        if image is None:
            return _text_inputs(tokenizer, question)
        ids = torch.tensor([tokenizer(_turn(question, IMAGE_TOKEN * spec.num_patches)).input_ids])
        pixels = image_processor([image], return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    return Family(
        "hf_llava",
        build_hf_llava(spec, tokenizer),
        build_hf_llava(teacher_spec(), tokenizer),
        tokenizer,
        lambda tok: build_llava_processor(spec, tok),
        qwen.make_images(len(QUESTIONS), seed=4, size=spec.image_size),
        prompt_inputs,
    )


FAMILIES = {"qwen2_5_vl": _qwen_family, "hf_llava": _llava_family}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request) -> Family:
    built = FAMILIES[request.param]()
    built.teacher.requires_grad_(False).eval()
    return built


# ----------------------------------------------------------------------------- reference


def _generated_alone(family: Family, eos: list[int], images: list) -> list[dict]:
    """Each sample's prompt inputs (rendered by hand; `images[i]` None: text only) and greedy
    response, generated alone."""
    model = copy.deepcopy(family.student).eval()
    samples = []
    for question, image in zip(QUESTIONS, images, strict=True):
        inputs = family.prompt_inputs(question, image)
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                pad_token_id=family.tokenizer.pad_token_id, temperature=None, top_p=None,
                top_k=None,
            )  # fmt: skip
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        ends = [i for i, token in enumerate(new) if token in eos]
        samples.append({**inputs, "response": new[: ends[0] + 1] if ends else new})
    return samples


def _by_hand(samples: list[dict], pad: int) -> dict:
    """Prompt + response per sample, right-padded, the response supervised; image inputs
    concatenated in order."""
    rows = [s["input_ids"][0].tolist() + s["response"] for s in samples]
    width = max(map(len, rows))

    def padded(row: list[int], value: int) -> list[int]:
        return row + [value] * (width - len(row))

    labels = [[IGNORE_INDEX] * s["input_ids"].shape[1] + s["response"] for s in samples]
    batch = {
        "input_ids": torch.tensor([padded(r, pad) for r in rows]),
        "attention_mask": torch.tensor([padded([1] * len(r), 0) for r in rows]),
        "labels": torch.tensor([padded(r, IGNORE_INDEX) for r in labels]),
    }
    if "mm_token_type_ids" in samples[0]:
        types = [s["mm_token_type_ids"][0].tolist() + [0] * len(s["response"]) for s in samples]
        batch["mm_token_type_ids"] = torch.tensor([padded(t, 0) for t in types])
    for key in ("pixel_values", "image_grid_thw"):
        if key in samples[0]:
            batch[key] = torch.cat([s[key] for s in samples])
    return batch


# ----------------------------------------------------------------------------- fixtures


def _dataset(images: list | None) -> datasets.Dataset:
    """TRL's prompt-only vision format: a conversational `prompt` and its `images`; text-only
    prompts (no `images` column) with `images` None."""
    image_part = [] if images is None else [{"type": "image"}]
    prompts = [
        [{"role": "user", "content": [*image_part, {"type": "text", "text": q}]}] for q in QUESTIONS
    ]
    if images is None:
        return datasets.Dataset.from_dict({"prompt": prompts})
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


def _trainer(
    family: Family, config, processor=None, student=None, text_only=False, wrap=None, **switchkd
):
    """Switch-KD on TRL's DistillationTrainer: `student` (default: a copy of the family's), on
    the family's image prompts or `text_only` ones; `wrap`: applied to the trainer class."""
    trainer_class = switchkd_trainer_class(trl.DistillationTrainer)
    return (wrap or (lambda cls: cls))(trainer_class)(
        model=student if student is not None else copy.deepcopy(family.student),
        teacher_model=family.teacher,
        args=config,
        train_dataset=_dataset(None if text_only else family.images),
        processing_class=processor or family.processor(),
        teacher_tokenizer=family.tokenizer,
        switchkd_args=SwitchKDArguments(
            **{"distill": "switchkd", "teacher_model_path": "given-as-object", **switchkd}
        ),
    )


def _eos_ending_sample_0_early(family: Family) -> int:
    """A token sample 0's greedy response reaches before `MAX_NEW` and sample 1's never
    contains: as an EOS, sample 0 stops there and sample 1 runs to `max_completion_length`."""
    free = _generated_alone(family, [family.tokenizer.eos_token_id], family.images)
    return eos_ending_first_early(free[0]["response"], free[1]["response"], MAX_NEW)[0]


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    ("accumulation", "text_only"),
    [(1, False), (2, False), (1, True)],
    ids=["batch2", "2x1_accumulated", "text_only_prompts"],
)
def test_step_equals_generate_alone_then_the_off_policy_step(
    family, tmp_path, accumulation, text_only
):
    """Greedy: TRL's generation (prompts left-padded together) + the repacked batch + Switch-KD
    equals generating each prompt alone and taking the off-policy step with `w_ce` 0 on the
    batch built by hand. Sample 0 stops at an EOS (kept, supervised), sample 1 runs to
    `max_completion_length`. Accumulating two micro-batches of one takes the same step (TRL's
    count of the window's completion tokens normalises both). Text-only prompts (no images in
    the dataset): the text-only step, no visual-switch rows."""
    student, tokenizer = copy.deepcopy(family.student), family.tokenizer
    stop = _eos_ending_sample_0_early(family)
    student.generation_config.eos_token_id = stop  # TRL adds the tokenizer's own EOS
    images = [None] * len(QUESTIONS) if text_only else family.images
    samples = _generated_alone(
        dataclasses.replace(family, student=student), [tokenizer.eos_token_id, stop], images
    )
    if not text_only:  # the EOS was chosen on the image prompts' responses
        assert samples[0]["response"][-1] == stop and len(samples[0]["response"]) < MAX_NEW
        assert len(samples[1]["response"]) == MAX_NEW
    expected = _by_hand(samples, tokenizer.pad_token_id)

    config = _config(
        tmp_path / "trl",
        per_device_train_batch_size=2 // accumulation,
        gradient_accumulation_steps=accumulation,
    )
    trainer = _trainer(family, config, student=copy.deepcopy(student), text_only=text_only)
    trainer.train()
    reference = make_trainer(
        copy.deepcopy(student), tokenizer, [expected], tmp_path / "ref", teacher=family.teacher,
        w_ce=0.0,
    )  # fmt: skip
    reference.train()
    assert_same_step(trainer.model.state_dict(), reference.model.state_dict(), student.state_dict())
    logged = next(entry for entry in trainer.state.log_history if "total" in entry)
    assert logged["total"] == pytest.approx(reference.state.log_history[0]["total"], rel=1e-5)
    assert logged["completions/max_length"] == max(len(s["response"]) for s in samples)
    assert logged["vsd_tokens"] == (0 if text_only else logged["distilled_tokens"])


def test_distill_none_leaves_trls_own_divergence(family, tmp_path):
    """`--distill none`: the DistillationTrainer as TRL ships it (its JSD; no Switch-KD terms)."""
    trainer = switchkd_trainer_class(trl.DistillationTrainer)(
        model=copy.deepcopy(family.student),
        teacher_model=copy.deepcopy(family.teacher),
        args=_config(tmp_path),
        train_dataset=_dataset(family.images),
        processing_class=family.processor(),
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
    family, tmp_path, switchkd, config, message
):
    with pytest.raises(ValueError, match=message):
        _trainer(family, _config(tmp_path, **config), **switchkd)


def test_right_padding_processor_is_refused_with_the_fix(family, tmp_path):
    """TRL renders the prompts' image inputs with the processor's padding: on the right they
    would not line up with its left-padded prompt ids."""
    with pytest.raises(ValueError, match=r"padding_side = 'left'"):
        _trainer(family, _config(tmp_path), processor=family.processor(padding_side="right"))


def test_tools_and_hand_built_classes_are_refused_by_name(family, tmp_path):
    def tool(x: int) -> int:
        """Adds one.

        Args:
            x: a number.
        """
        return x + 1

    with pytest.raises(NotImplementedError, match=r"tools= .* not supported yet"):
        switchkd_trainer_class(trl.DistillationTrainer)(
            model=family.student, teacher_model=family.teacher, args=_config(tmp_path),
            tools=[tool], train_dataset=_dataset(family.images),
            switchkd_args=SwitchKDArguments(distill="switchkd", teacher_model_path="given"),
        )  # fmt: skip
    by_hand = type("ByHand", (SwitchKDTrainerMixin, trl.DistillationTrainer), {})
    with pytest.raises(NotImplementedError, match=r"switchkd_trainer_class\(trl\.Distillation"):
        by_hand(model=family.student, args=_config(tmp_path))


@pytest.mark.parametrize("layout", ["ddp", "zero3", "fsdp2"])
def test_two_ranks_take_the_one_rank_step(family, tmp_path, layout):
    """One prompt per rank (each generated alone, greedy), DDP, ZeRO-3 or FSDP2 (the student
    sharded by the Trainer, the teacher by Switch-KD; TRL generates with the sharded student):
    the step of one rank on both prompts. TRL's count of the window's completion tokens is
    over every rank already; counting it again would change the step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from test_trainer_dp import HAS_DEEPSPEED, NO_SHM, OLD_ZERO3, _deepspeed_config

    if family.name != "qwen2_5_vl":  # one family: the layouts do not depend on it (CI time)
        pytest.skip("the 2-rank DistillationTrainer layouts run on Qwen2.5-VL only")
    if layout == "zero3" and (not HAS_DEEPSPEED or OLD_ZERO3):
        pytest.skip("needs deepspeed with ZeRO-3 Switch-KD (pip install -e '.[deepspeed]')")
    one = _trainer(family, _config(tmp_path / "one"))
    one.train()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argument = layout
    if layout == "zero3":
        argument = str(_deepspeed_config(3, tmp_path))
        env["PYTHONPATH"] = os.pathsep.join([str(NO_SHM), os.environ.get("PYTHONPATH", "")])
    worker = Path(__file__).with_name("_distillation_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launch, str(worker), str(tmp_path / "two"), argument], env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = type(family.student).from_pretrained(tmp_path / "two").state_dict()
    assert_same_step(after, one.model.state_dict(), family.student.state_dict())
