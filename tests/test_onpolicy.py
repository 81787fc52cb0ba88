"""On-policy Switch-KD (`--lmbda`, `--seq_kd`) through the real Trainer, on real tiny VLMs.

The reference of an on-policy step is built here independently: each sample's prompt generated
from alone (no padding, batch of one), the batch re-assembled by hand, then the ordinary
off-policy step (with `w_ce` 0) on it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.adapters.tinyllava import TinyLlavaAdapter
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.testing import (
    FACTORY_IMAGE_TOKEN_INDEX,
    IGNORE_INDEX,
    make_host_batch,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing import qwen_vl as qwen
from switchkd_plugin.testing.generation import eos_ending_first_early
from switchkd_plugin.testing.trainer import assert_same_step, make_trainer
from switchkd_plugin.training.onpolicy import (
    GenerationSettings,
    cut_at_eos,
    prompt_lengths,
    rebuilt_batch,
)

MAX_NEW = 6
GREEDY = {"lmbda": 1.0, "generation_temperature": 0.0, "max_new_tokens": MAX_NEW}


# ----------------------------------------------------------------------------- reference


def _image_token(model) -> int:
    config = model.config
    if isinstance(adapter_for(model), TinyLlavaAdapter):
        return FACTORY_IMAGE_TOKEN_INDEX
    return getattr(config, "image_token_id", None) or config.image_token_index


def _sample_images(batch: dict, b: int, image_token: int) -> dict:
    """The image inputs of sample `b` alone (LLaVA: one image per image sample, in order;
    Qwen-VL: its patch rows and grid); none for a text-only sample."""
    if "images" in batch:  # TinyLLaVA: one (possibly blank) image per sample
        return {"images": batch["images"][b : b + 1]}
    has_image = (batch["input_ids"] == image_token).any(1).tolist()
    if not has_image[b]:
        return {}
    index = sum(has_image[:b])
    if "image_grid_thw" not in batch:
        return {"pixel_values": batch["pixel_values"][index : index + 1]}
    patches = batch["image_grid_thw"].prod(1).tolist()
    start = sum(patches[:index])
    return {
        "pixel_values": batch["pixel_values"][start : start + patches[index]],
        "image_grid_thw": batch["image_grid_thw"][index : index + 1],
    }


def _generated_alone(model, batch: dict, eos: int, pad: int) -> list[torch.Tensor]:
    """Each sample's greedy response, its prompt generated from alone (no padding)."""
    model = copy.deepcopy(model).eval()
    responses = []
    for b in range(batch["input_ids"].shape[0]):
        supervised = (batch["labels"][b] != IGNORE_INDEX).nonzero()
        length = int(supervised[0])
        factory = isinstance(adapter_for(model), TinyLlavaAdapter)
        ids_key = "inputs" if factory else "input_ids"  # the Factory's generate(inputs, images)
        inputs = {
            ids_key: batch["input_ids"][b : b + 1, :length],
            "attention_mask": torch.ones(1, length, dtype=torch.long),
            **_sample_images(batch, b, _image_token(model)),
        }
        if "mm_token_type_ids" in batch:
            inputs["mm_token_type_ids"] = batch["mm_token_type_ids"][b : b + 1, :length]
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        new = out[0] if factory else out[0, length:]  # the Factory returns new tokens only
        ends = (new == eos).nonzero()
        responses.append(new[: int(ends[0]) + 1] if len(ends) else new)
    return responses


def _by_hand(batch: dict, responses: list[torch.Tensor], pad: int) -> dict:
    """The batch rebuilt by hand: prompt + response, right-padded, response supervised."""
    rows, labels, types = [], [], []
    for b, response in enumerate(responses):
        length = int((batch["labels"][b] != IGNORE_INDEX).nonzero()[0])
        prompt = batch["input_ids"][b, :length].tolist()
        rows.append(prompt + response.tolist())
        labels.append([IGNORE_INDEX] * length + response.tolist())
        if "mm_token_type_ids" in batch:
            types.append(batch["mm_token_type_ids"][b, :length].tolist() + [0] * len(response))
    width = max(map(len, rows))

    def pad_to(row: list[int], value: int) -> list[int]:
        return row + [value] * (width - len(row))

    out = dict(batch)
    out["input_ids"] = torch.tensor([pad_to(r, pad) for r in rows])
    out["labels"] = torch.tensor([pad_to(r, IGNORE_INDEX) for r in labels])
    out["attention_mask"] = torch.tensor([pad_to([1] * len(r), 0) for r in rows])
    if types:
        out["mm_token_type_ids"] = torch.tensor([pad_to(t, 0) for t in types])
    return out


def _eos_ending_one_sample_early(model, batch: dict, pad: int) -> tuple[int, int]:
    """A token that sample 0's greedy response reaches before `max_new_tokens` and no other
    sample's response (nor sample 0's earlier ones) contains: with it as EOS, sample 0 stops
    there and every other sample runs to `max_new_tokens`. Returns (token, sample 0's length).
    """
    free = _generated_alone(model, batch, eos=-1, pad=pad)  # no token is -1: no stop
    others = (token for other in free[1:] for token in other.tolist())
    return eos_ending_first_early(free[0].tolist(), others, MAX_NEW)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["hf_llava", "hf_llava_text_only_row", "qwen2_5_vl", "tinyllava"])
def host(request, hf_student, hf_teacher, tiny_tokenizer):
    """(student, teacher, tokenizer, batch) of one host."""
    if request.param == "tinyllava":  # skips without the Factory
        student = request.getfixturevalue("tinyllava_student")
        teacher = request.getfixturevalue("tinyllava_teacher")
        # Seeds where sample 0's greedy response has a token the others' lack (random tiny
        # Factory models often answer every prompt alike), for each generating model.
        seed = 0 if request.node.callspec.params.get("seq_kd") else 1
        batch = make_host_batch(student, tiny_tokenizer, n=3, seed=seed, text_only_rows=(1,))
        return copy.deepcopy(student), teacher, tiny_tokenizer, batch
    if request.param.startswith("hf_llava"):
        text_only = (1,) if request.param.endswith("text_only_row") else ()
        batch = make_host_batch(hf_student, tiny_tokenizer, n=3, seed=5, text_only_rows=text_only)
        return copy.deepcopy(hf_student), hf_teacher, tiny_tokenizer, batch
    if not hasattr(transformers, "Qwen2_5_VLForConditionalGeneration"):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")
    tokenizer = qwen.build_qwen_vl_tokenizer()
    student = qwen.build_qwen_vl("qwen2_5_vl", student_spec(), tokenizer)
    teacher = qwen.build_qwen_vl("qwen2_5_vl", teacher_spec(), tokenizer).requires_grad_(False)
    batch = qwen.make_qwen_vl_batch(tokenizer, n=3, seed=3)
    return student, teacher.eval(), tokenizer, batch


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seq_kd", [False, True], ids=["student", "seq_kd"])
def test_onpolicy_step_equals_generate_then_the_off_policy_step(host, tmp_path, seq_kd):
    """`--lmbda 1`, greedy: the step equals generating each response alone (the student's, or
    the teacher's with `--seq_kd`), rebuilding the batch by hand and taking the off-policy step
    with `w_ce` 0 on it. Sample 0 stops at EOS (kept, supervised), the others run to
    `max_new_tokens`."""
    student, teacher, tokenizer, batch = host
    generator = teacher if seq_kd else student
    pad = tokenizer.pad_token_id
    eos, stop = _eos_ending_one_sample_early(generator, batch, pad)
    for model in (student, teacher):
        model.generation_config.eos_token_id = eos
    responses = _generated_alone(generator, batch, eos, pad)
    assert len(responses[0]) == stop < MAX_NEW and int(responses[0][-1]) == eos
    assert all(len(r) == MAX_NEW and eos not in r.tolist() for r in responses[1:])
    expected_batch = _by_hand(batch, responses, pad)

    onpolicy = make_trainer(
        copy.deepcopy(student), tokenizer, [batch], tmp_path, teacher=teacher,
        seq_kd=seq_kd, **GREEDY,
    )  # fmt: skip
    onpolicy.train()
    reference = make_trainer(
        copy.deepcopy(student), tokenizer, [expected_batch], tmp_path, teacher=teacher, w_ce=0.0
    )
    reference.train()
    assert_same_step(
        onpolicy.model.state_dict(), reference.model.state_dict(), student.state_dict()
    )
    logged = [entry for entry in onpolicy.state.log_history if "loss" in entry]
    assert logged[0]["onpolicy_batches"] == 1
    assert logged[0]["total"] == pytest.approx(reference.state.log_history[0]["total"], rel=1e-5)


def test_a_batch_drawn_off_policy_trains_exactly_as_without_the_flag(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    """With `--lmbda` > 0, a micro-batch drawn off-policy is trained bit for bit as today;
    `--lmbda 0` builds no on-policy machinery at all."""
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=s) for s in range(2)]
    runs = []
    for lmbda in (0.0, 1e-9):  # 1e-9: every draw lands off-policy
        trainer = make_trainer(
            copy.deepcopy(hf_student), tiny_tokenizer, batches, tmp_path, teacher=hf_teacher,
            lmbda=lmbda, training={"max_steps": 2},
        )  # fmt: skip
        assert (trainer._onpolicy is None) == (lmbda == 0)
        trainer.train()
        runs.append(trainer)
    for name, value in runs[0].model.state_dict().items():
        assert torch.equal(runs[1].model.state_dict()[name], value), name
    logged = [entry for entry in runs[1].state.log_history if "loss" in entry]
    assert [entry["onpolicy_batches"] for entry in logged] == [0, 0]


def test_the_image_placeholder_is_never_generated(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    """A student that prefers HF LLaVA's image token above all others still never generates
    it: one in a response would ask the rebuilt batch for an image it does not have."""
    student = copy.deepcopy(hf_student)
    image = _image_token(student)

    def favour_the_image_token(module, inputs, logits):
        bonus = torch.zeros_like(logits)
        bonus[..., image] = 100.0
        return logits + bonus

    student.get_output_embeddings().register_forward_hook(favour_the_image_token)
    batch = make_host_batch(student, tiny_tokenizer, n=2, seed=5)
    trainer = make_trainer(student, tiny_tokenizer, [batch], tmp_path, teacher=hf_teacher, **GREEDY)
    rebuilt = trainer._onpolicy(batch)
    responses = rebuilt["labels"][rebuilt["labels"] != IGNORE_INDEX]
    assert len(responses) > 0 and image not in responses.tolist()
    trainer.train()  # the rebuilt batch trains


def test_resumed_onpolicy_run_generates_and_trains_as_the_uninterrupted_one(
    hf_student, hf_teacher, tiny_tokenizer, tmp_path
):
    """Sampled generation (temperature 1) and a mix of on- and off-policy batches: the
    decisions and the sampling seeds resume from the checkpoint."""
    batches = [make_host_batch(hf_student, tiny_tokenizer, n=2, seed=s) for s in range(6)]
    training = {
        "max_steps": 6, "save_strategy": "steps", "save_steps": 3, "optim": "adamw_torch",
        "learning_rate": 3e-3,
    }  # fmt: skip

    def run(out, resume=None):
        trainer = make_trainer(
            copy.deepcopy(hf_student), tiny_tokenizer, batches, out, teacher=hf_teacher,
            lmbda=0.5, max_new_tokens=5, training=training,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    flags = [e["onpolicy_batches"] for e in whole.state.log_history if "loss" in e]
    assert 0 < sum(flags) < 6, f"a mix of on- and off-policy batches is needed, got {flags}"

    def logs(trainer):
        return [
            (e["step"], e["onpolicy_batches"], e["total"])
            for e in trainer.state.log_history
            if "loss" in e and e["step"] > 3
        ]

    assert logs(resumed) == logs(whole)
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_rebuilt_batch_keeps_prompts_and_supervises_responses_only():
    """Unit view of the rebuild: prompts stay, responses (to EOS, or cut) become the labels,
    token types are 0 on responses and padding."""
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 9, 7, 8, 8]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, -100, -100, 8, 8]]),
        "mm_token_type_ids": torch.tensor([[0, 1, 0, 0, 0], [0, 1, 0, 0, 0]]),
    }
    lengths = prompt_lengths(batch)
    assert lengths.tolist() == [2, 3]
    responses = cut_at_eos(torch.tensor([[11, 2, 0], [12, 13, 14]]), (2,))
    assert [r.tolist() for r in responses] == [[11, 2], [12, 13, 14]]
    out = rebuilt_batch(batch, lengths, responses, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 11, 2, 0, 0], [5, 9, 7, 12, 13, 14]]
    assert out["labels"].tolist() == [
        [-100, -100, 11, 2, -100, -100],
        [-100, -100, -100, 12, 13, 14],
    ]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]]


def test_left_padded_batches_are_refused_with_the_fix():
    batch = {
        "input_ids": torch.tensor([[0, 5, 6], [5, 6, 7]]),
        "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 6], [-100, -100, 7]]),
    }
    with pytest.raises(ValueError, match="padding_side='right'"):
        prompt_lengths(batch)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"lmbda": 1.5}, "--lmbda is a probability"),
        ({"lmbda": 0.5, "max_new_tokens": 0}, "--max_new_tokens must be >= 1"),
        ({"lmbda": 0.5, "generation_temperature": -1.0}, "--generation_temperature"),
        ({"lmbda": 0.5, "top_p": 0.0}, "--top_p must be in"),
        ({"seq_kd": True}, "--seq_kd sets who generates"),
        ({"lmbda": 0.5, "distill": "none"}, "needs --distill switchkd"),
        ({"lmbda": 0.5, "w_align": 0.0, "w_vsd": 0.0}, "leaves nothing to learn"),
    ],
)
def test_bad_onpolicy_flags_are_refused_at_parse_time(flags, message):
    settings = {"distill": "switchkd", "teacher_model_path": "dir", **flags}
    with pytest.raises(ValueError, match=message):
        SwitchKDArguments(**settings)


def test_generation_settings_greedy_ignores_the_models_sampling_config():
    greedy = GenerationSettings(4, 0.0, 0.9, (2,), 0).generate_kwargs()
    assert greedy["do_sample"] is False and greedy["temperature"] is None
    sampled = GenerationSettings(4, 0.7, 0.9, (2,), 0).generate_kwargs()
    assert sampled["do_sample"] and sampled["temperature"] == 0.7 and sampled["top_p"] == 0.9
