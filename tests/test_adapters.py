"""Adapters reproduce each host's own forward, loss and gradients on real tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from switchkd_plugin.adapters import (
    HFLlavaAdapter,
    MultimodalInputs,
    SpliceRules,
    TinyLlavaAdapter,
    VLMAdapter,
    adapter_for,
    splice_image_features,
)
from switchkd_plugin.testing import (
    IGNORE_INDEX,
    build_hf_llava,
    hf_image_token_conventions,
    make_batch,
    student_spec,
)
from switchkd_plugin.testing.tensor_close import assert_close, assert_same_gradients


def _shifted_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token CE over labels != -100: logits [B, S, V], labels [B, S]."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


def _adapter_logits(adapter: VLMAdapter, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The adapter pathway: logits [B, S, V] and spliced labels [B, S]."""
    features = adapter.project(adapter.encode_vision(batch[adapter.images_key]))
    inputs = adapter.build_inputs(
        batch["input_ids"], batch["attention_mask"], batch["labels"], features
    )
    return adapter.lm_head(adapter.decode(inputs)), inputs.labels


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()
    }


def _assert_reproduces_host(model: nn.Module, batch: dict[str, Tensor]) -> None:
    """Logits at supervised positions, loss and every parameter's gradient match the host's."""
    model.zero_grad()
    host = model(**batch)
    host.loss.backward()
    host_grads = _grads(model)

    model.zero_grad()
    logits, labels = _adapter_logits(adapter_for(model), batch)
    loss = _shifted_ce(logits, labels)
    loss.backward()

    assert logits.shape == host.logits.shape
    supervised = labels[:, 1:] != IGNORE_INDEX
    assert int(supervised.sum()) > 0
    hidden = adapter_for(model).lm_hidden_size  # each logit is an H-term dot product
    assert_close(
        logits[:, :-1][supervised], host.logits[:, :-1][supervised], terms=hidden, name="logits"
    )
    assert_close(loss, host.loss, terms=int(supervised.sum()), name="loss")
    # None where the host computes none too (e.g. the unused last vision layer).
    assert_same_gradients(_grads(model), host_grads, terms=labels.numel())
    model.zero_grad()


def _hf_batch(model: nn.Module, tokenizer, convention: str, **kwargs) -> dict[str, Tensor]:
    if convention not in hf_image_token_conventions(model):
        pytest.skip(
            f"transformers {transformers.__version__} LLaVA does not accept the {convention!r} "
            "image-token convention"
        )
    tokens = 1
    if convention == "expanded":
        adapter = adapter_for(model)
        tokens = adapter.encode_vision(torch.zeros(1, 3, 32, 32)).shape[1]
    return make_batch(tokenizer, "hf_llava", n=3, image_tokens_per_image=tokens, **kwargs)


# ------------------------------------------------------------------------------ host parity


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("convention", ["single", "expanded"])
def test_hf_llava_adapter_reproduces_forward(
    hf_student, tiny_tokenizer, convention: str, padding_side: str
) -> None:
    batch = _hf_batch(hf_student, tiny_tokenizer, convention, padding_side=padding_side)
    _assert_reproduces_host(hf_student, batch)


@pytest.mark.parametrize("convention", ["single", "expanded"])
def test_hf_llava_default_strategy_drops_first_patch(tiny_tokenizer, convention: str) -> None:
    model = build_hf_llava(student_spec(), tiny_tokenizer, select_strategy="default")
    features = adapter_for(model).encode_vision(torch.zeros(2, 3, 32, 32))
    assert features.shape == (2, student_spec().num_patches - 1, 32)
    _assert_reproduces_host(model, _hf_batch(model, tiny_tokenizer, convention))


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_tinyllava_adapter_reproduces_forward(
    tinyllava_student, tiny_tokenizer, monkeypatch: pytest.MonkeyPatch, padding_side: str
) -> None:
    monkeypatch.setattr(tinyllava_student.config, "tokenizer_padding_side", padding_side)
    _assert_reproduces_host(tinyllava_student, make_batch(tiny_tokenizer, "tinyllava", n=3))


@pytest.mark.parametrize(
    ("padding_side", "max_length", "text_only_row"),
    [("right", None, None), ("left", None, None), ("right", 60, None), ("right", None, 1)],
    ids=["right", "left", "truncated", "text-only-sample"],
)
def test_tinyllava_splice_equals_factory(
    tinyllava_student,
    tiny_tokenizer,
    monkeypatch: pytest.MonkeyPatch,
    padding_side: str,
    max_length: int | None,
    text_only_row: int | None,
) -> None:
    """build_inputs == the Factory's prepare_inputs_labels_for_multimodal, exactly."""
    model = tinyllava_student
    monkeypatch.setattr(model.config, "tokenizer_padding_side", padding_side)
    monkeypatch.setattr(model.config, "tokenizer_model_max_length", max_length)
    batch = make_batch(tiny_tokenizer, "tinyllava", n=3)
    if text_only_row is not None:  # the Factory still feeds this sample a (dummy) image
        ids = batch["input_ids"][text_only_row]
        ids[ids == -200] = tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    ids, mask, labels, images = (
        batch[k] for k in ("input_ids", "attention_mask", "labels", "images")
    )
    positions = torch.arange(ids.shape[1]).expand_as(ids)  # so the Factory returns its positions
    with torch.no_grad():
        _, host_pos, host_mask, _, host_embeds, host_labels = (
            model.prepare_inputs_labels_for_multimodal(ids, positions, mask, None, labels, images)
        )
        adapter = adapter_for(model)
        ours = adapter.build_inputs(
            ids, mask, labels, adapter.project(adapter.encode_vision(images))
        )
    assert torch.equal(ours.inputs_embeds, host_embeds)
    assert torch.equal(ours.labels, host_labels)
    assert torch.equal(ours.attention_mask, host_mask)
    assert torch.equal(ours.position_ids, host_pos)


# ------------------------------------------------------------------------------------ splice


def _text_rows(inputs: MultimodalInputs, image_rows: Tensor) -> list[Tensor]:
    """Per sample, the attended embeddings that are not image features: [T_b, H]."""
    mask = inputs.attention_mask.bool()
    return [inputs.inputs_embeds[b][mask[b] & ~image_rows[b]] for b in range(mask.shape[0])]


def _supervised(inputs: MultimodalInputs) -> list[list[int]]:
    return [row[row != IGNORE_INDEX].tolist() for row in inputs.labels]


@pytest.mark.parametrize("host", ["hf_llava", "tinyllava"])
def test_splice_with_other_feature_count_keeps_text_and_labels(
    request: pytest.FixtureRequest, tiny_tokenizer, host: str
) -> None:
    """A connector emitting P' != P tokens (or != the pre-expanded placeholder run) changes
    only the image blocks: same text rows, same supervised label sequence."""
    model = request.getfixturevalue("hf_student" if host == "hf_llava" else "tinyllava_student")
    adapter = adapter_for(model)
    tokens = 16 if host == "hf_llava" else 1  # a pre-expanded run of 16 for HF
    batch = make_batch(tiny_tokenizer, host, n=3, image_tokens_per_image=tokens)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        features = adapter.project(adapter.encode_vision(batch[adapter.images_key]))
        full = adapter.build_inputs(ids, mask, labels, features)  # 16 (HF) or 15 per image
        short = adapter.build_inputs(ids, mask, labels, features[:, :5])  # 5 per image
    assert _supervised(full) == _supervised(short)
    lengths = full.attention_mask.bool().sum(1) - short.attention_mask.bool().sum(1)
    assert lengths.tolist() == [features.shape[1] - 5] * 3
    image_rows = [
        torch.isin(inp.inputs_embeds, features.flatten(0, 1)).all(-1) for inp in (full, short)
    ]
    for a, b in zip(_text_rows(full, image_rows[0]), _text_rows(short, image_rows[1]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("merge_runs", "expected_images"), [(False, 3), (True, 2)])
def test_splice_placeholder_runs(merge_runs: bool, expected_images: int) -> None:
    """Adjacent placeholders are one image per id (TinyLLaVA) or one per run (HF LLaVA)."""
    embed = nn.Embedding(10, 4)
    ids = torch.tensor([[1, 9, 9, 2, 9, 3]])
    rules = SpliceRules(placeholder_id=9, merge_runs=merge_runs, text_only_consumes_image=False)
    images = [torch.full((k + 1, 4), float(k + 10)) for k in range(expected_images)]
    out = splice_image_features(ids, torch.ones_like(ids), ids.clone(), images, embed, rules)
    expected_length = 3 + sum(image.shape[0] for image in images)
    assert out.inputs_embeds.shape == (1, expected_length, 4)
    assert out.labels[0].tolist().count(IGNORE_INDEX) == expected_length - 3
    assert out.labels[0][out.labels[0] != IGNORE_INDEX].tolist() == [1, 2, 3]
    assert out.position_ids[0].tolist() == list(range(expected_length))
    with pytest.raises(ValueError, match=f"call for {expected_images} images, but 1"):
        splice_image_features(ids, torch.ones_like(ids), None, images[:1], embed, rules)


# --------------------------------------------------------------------------- adapter choice


def test_adapter_for_picks_by_class(hf_student) -> None:
    assert isinstance(adapter_for(hf_student), HFLlavaAdapter)
    assert not TinyLlavaAdapter.supports(hf_student)


def test_adapter_for_tinyllava(tinyllava_student) -> None:
    assert isinstance(adapter_for(tinyllava_student), TinyLlavaAdapter)
    assert not HFLlavaAdapter.supports(tinyllava_student)


def test_adapter_for_unsupported_model_raises_type_error() -> None:
    with pytest.raises(TypeError) as excinfo:
        adapter_for(nn.Linear(2, 2))
    message = str(excinfo.value)
    assert "torch.nn.modules.linear.Linear" in message
    assert TinyLlavaAdapter.host_class_name in message
    assert HFLlavaAdapter.host_class_name in message


def test_adapter_for_wrapper_hints_at_unwrapping(hf_student) -> None:
    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match=r"pass the wrapped model, e\.g\. `\.module`"):
        adapter_for(Wrapper(hf_student))


def test_adapter_for_unwraps_peft(tiny_tokenizer) -> None:
    peft = pytest.importorskip("peft")
    model = build_hf_llava(student_spec(), tiny_tokenizer)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(model, lora)
    adapter = adapter_for(peft_model)
    assert adapter.model is peft_model.get_base_model()
    batch = _hf_batch(model, tiny_tokenizer, next(iter(sorted(hf_image_token_conventions(model)))))
    with torch.no_grad():
        logits, labels = _adapter_logits(adapter, batch)
        expected = peft_model(**batch).logits
    supervised = labels[:, 1:] != IGNORE_INDEX
    hidden = adapter.lm_hidden_size
    assert_close(logits[:, :-1][supervised], expected[:, :-1][supervised], terms=hidden)


# ------------------------------------------------------------------------- widths and switch


@pytest.mark.parametrize("host", ["hf_llava", "tinyllava"])
def test_widths_allow_the_visual_switch(
    request: pytest.FixtureRequest, tiny_tokenizer, host: str
) -> None:
    """Student vision output fits the teacher connector; the switch pathway runs and sends
    gradient into the student's vision encoder."""
    prefix = "hf" if host == "hf_llava" else "tinyllava"
    student = adapter_for(request.getfixturevalue(f"{prefix}_student"))
    teacher = adapter_for(request.getfixturevalue(f"{prefix}_teacher"))
    assert student.vision_output_width == teacher.connector_input_width == 32
    assert (student.connector_output_width, student.lm_hidden_size) == (64, 64)
    assert (teacher.connector_output_width, teacher.lm_hidden_size) == (96, 96)

    batch = make_batch(tiny_tokenizer, host, n=2)
    if host == "hf_llava" and "single" not in hf_image_token_conventions(student.model):
        batch = make_batch(tiny_tokenizer, host, n=2, image_tokens_per_image=16)
    student.model.zero_grad()
    features = teacher.project(student.encode_vision(batch[student.images_key]))
    inputs = teacher.build_inputs(
        batch["input_ids"], batch["attention_mask"], batch["labels"], features
    )
    _shifted_ce(teacher.lm_head(teacher.decode(inputs)), inputs.labels).backward()
    vision_grads = [p.grad for p in student.vision_module.parameters() if p.grad is not None]
    assert vision_grads and any(bool(g.abs().sum() > 0) for g in vision_grads)
    assert all(p.grad is None for p in student.connector.parameters())
    student.model.zero_grad()
    teacher.model.zero_grad()
