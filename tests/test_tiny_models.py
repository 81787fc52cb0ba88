"""The tiny fixtures themselves: tokenizer, specs, model builders, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from switchkd_plugin.testing import (
    FACTORY_IMAGE_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    build_hf_llava,
    build_tokenizer,
    make_batch,
    make_conversations,
    student_spec,
    teacher_spec,
)

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
SAMPLE_TEXT = "USER: <image>\nis there a red circle on the left? ASSISTANT: yes.<|im_end|>"


# ----------------------------------------------------------------------------------- tokenizer


def test_tokenizer_vocabulary_and_special_tokens(tiny_tokenizer) -> None:
    assert len(tiny_tokenizer) == 600
    assert tiny_tokenizer.pad_token == "<|endoftext|>"
    assert tiny_tokenizer.eos_token == "<|im_end|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN):
        assert tiny_tokenizer(token).input_ids == [tiny_tokenizer.convert_tokens_to_ids(token)]
    assert tiny_tokenizer.decode(tiny_tokenizer(SAMPLE_TEXT).input_ids) == SAMPLE_TEXT


def test_tokenizer_is_deterministic(tiny_tokenizer) -> None:
    again = build_tokenizer()
    assert again.get_vocab() == tiny_tokenizer.get_vocab()
    assert again(SAMPLE_TEXT).input_ids == tiny_tokenizer(SAMPLE_TEXT).input_ids


@pytest.mark.parametrize("use_fast", [True, False], ids=["fast", "slow"])
def test_tokenizer_save_reload_round_trip(tiny_tokenizer, tmp_path: Path, use_fast: bool) -> None:
    tiny_tokenizer.save_pretrained(tmp_path)
    if TRANSFORMERS_MAJOR < 5:
        # TinyLLaVA Factory loads with use_fast=False: the slow Qwen2 tokenizer needs these.
        assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path, use_fast=use_fast)
    assert len(reloaded) == len(tiny_tokenizer)
    assert (reloaded.pad_token, reloaded.eos_token) == ("<|endoftext|>", "<|im_end|>")
    for question, answer in make_conversations(8):
        text = f"USER: {IMAGE_TOKEN}\n{question} ASSISTANT: {answer}<|im_end|>"
        assert reloaded(text).input_ids == tiny_tokenizer(text).input_ids


# --------------------------------------------------------------------------------------- specs


def test_teacher_is_wider_and_deeper_with_equal_vision_width() -> None:
    teacher, student = teacher_spec(), student_spec()
    assert teacher.hidden_size > student.hidden_size
    assert teacher.num_layers > student.num_layers
    assert teacher.vision_hidden_size == student.vision_hidden_size
    assert teacher.num_patches == student.num_patches == 16
    assert teacher.seed != student.seed
    assert teacher_spec(hidden_size=128).hidden_size == 128


def test_hf_llava_follows_spec(tiny_tokenizer, hf_teacher, hf_student) -> None:
    for model, spec in ((hf_teacher, teacher_spec()), (hf_student, student_spec())):
        config = model.config
        assert isinstance(model, transformers.LlavaForConditionalGeneration)
        assert config.text_config.hidden_size == spec.hidden_size
        assert config.text_config.num_hidden_layers == spec.num_layers
        assert config.text_config.vocab_size == len(tiny_tokenizer)
        assert config.vision_config.hidden_size == spec.vision_hidden_size
        assert config.vision_feature_select_strategy == "full"
        assert all(p.dtype == torch.float32 for p in model.parameters())


def test_hf_llava_is_seeded_and_padded_vocab_is_honoured(tiny_tokenizer, hf_student) -> None:
    rng_before = torch.get_rng_state()
    again = build_hf_llava(student_spec(), tiny_tokenizer)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched
    for (name, p), q in zip(
        hf_student.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    padded = build_hf_llava(student_spec(vocab_multiple_of=64), tiny_tokenizer)
    assert padded.get_output_embeddings().weight.shape[0] == 640


# ------------------------------------------------------------------------------------- batches


def _check_batch(batch: dict[str, torch.Tensor], tokenizer, placeholder: int, count: int) -> None:
    """Shared invariants of a collated batch with one image per sample."""
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    lengths = mask.sum(1).tolist()
    assert len(set(lengths)) == len(lengths), "samples should differ in length"
    for ids, row_mask, row_labels in zip(input_ids, mask, labels, strict=True):
        assert int((ids[row_mask] == placeholder).sum()) == count
        assert (row_labels[~row_mask] == IGNORE_INDEX).all()
        assert (row_labels[ids == placeholder] == IGNORE_INDEX).all()
        supervised = row_labels[row_labels != IGNORE_INDEX]
        assert supervised[-1] == tokenizer.eos_token_id
        assert torch.equal(supervised, ids[row_labels != IGNORE_INDEX])


def test_make_batch_tinyllava(tiny_tokenizer) -> None:
    batch = make_batch(tiny_tokenizer, "tinyllava", n=3)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "images"}
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["images"].shape == (3, 3, 32, 32)
    _check_batch(batch, tiny_tokenizer, FACTORY_IMAGE_TOKEN_INDEX, 1)
    with pytest.raises(ValueError, match="single -200"):
        make_batch(tiny_tokenizer, "tinyllava", image_tokens_per_image=16)


@pytest.mark.parametrize("tokens_per_image", [1, 16])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_make_batch_hf_llava(tiny_tokenizer, tokens_per_image: int, padding_side: str) -> None:
    batch = make_batch(
        tiny_tokenizer,
        "hf_llava",
        n=3,
        image_tokens_per_image=tokens_per_image,
        padding_side=padding_side,
    )
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values"}
    assert batch["attention_mask"].dtype == torch.long
    image_id = tiny_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    _check_batch(batch, tiny_tokenizer, image_id, tokens_per_image)
    edge = 0 if padding_side == "left" else -1
    assert bool(batch["attention_mask"][:, edge].eq(0).any())


def test_make_batch_is_seeded_and_rejects_unknown_host(tiny_tokenizer) -> None:
    first, second = (make_batch(tiny_tokenizer, "hf_llava", seed=3) for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)
    other = make_batch(tiny_tokenizer, "hf_llava", seed=4)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    with pytest.raises(ValueError, match="unknown host"):
        make_batch(tiny_tokenizer, "llava_next")


# ------------------------------------------------------------------------------ TinyLLaVA build


def test_build_tinyllava_as_the_factory_does(tinyllava_student, tinyllava_teacher) -> None:
    from tinyllava.model.vision_tower.siglip import SIGLIPVisionTower

    for model, spec in ((tinyllava_student, student_spec()), (tinyllava_teacher, teacher_spec())):
        assert type(model).__name__ == "TinyLlavaForConditionalGeneration"
        assert isinstance(model.language_model, transformers.Qwen2ForCausalLM)
        assert isinstance(model.vision_tower, SIGLIPVisionTower)
        assert model.config.hidden_size == spec.hidden_size
        assert model.config.vision_hidden_size == spec.vision_hidden_size
        assert model.config.vision_feature_layer == spec.vision_feature_layer
        assert model.vision_tower._image_processor.size == {"height": 32, "width": 32}
        assert all(p.requires_grad for p in model.parameters())


def test_make_batch_matches_the_factory_data_pipeline(tinyllava_student) -> None:
    from tinyllava.data.dataset import DataCollatorForSupervisedDataset
    from tinyllava.data.template import TemplateFactory

    factory_tokenizer = tinyllava_student.tokenizer  # the slow tokenizer the Factory loaded
    template = TemplateFactory("qwen2_instruct")()
    instances = [
        template.encode(
            [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}, {"from": "gpt", "value": a}],
            factory_tokenizer,
        )
        for q, a in make_conversations(3)
    ]
    expected = DataCollatorForSupervisedDataset(tokenizer=factory_tokenizer)(instances)
    batch = make_batch(factory_tokenizer, "tinyllava", n=3)
    for key in ("input_ids", "labels", "attention_mask"):
        assert torch.equal(batch[key], expected[key]), key
