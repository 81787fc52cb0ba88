"""LLaVA-OneVision, InternVL, Gemma 3 and SmolVLM: each adapter reproduces its host, and a
Switch-KD step through the real Trainer routes every term where it belongs.

Real transformers classes on tiny offline configs (``switchkd_plugin.testing.families``);
skipped, with the reason, on releases without the family's class (e.g. 4.40.1).
"""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from test_engine import assert_text_only_rank_runs_the_image_ranks_calls
from test_trainer_dp import HAS_DEEPSPEED, _run
from torch import Tensor, nn

from switchkd_plugin.adapters import (
    ADAPTERS,
    Gemma3Adapter,
    InternVLAdapter,
    LlavaOnevisionAdapter,
    SmolVLMAdapter,
    adapter_for,
)
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.objective.engine import SwitchKDEngine
from switchkd_plugin.testing import IGNORE_INDEX, student_spec, teacher_spec
from switchkd_plugin.testing.families import (
    FAMILIES,
    build_family_model,
    build_family_tokenizer,
    family_skip_reason,
    make_family_batch,
)
from switchkd_plugin.testing.tensor_close import assert_close, assert_same_gradients
from switchkd_plugin.testing.trainer import assert_same_step, make_trainer
from switchkd_plugin.training.setup import engine_options

ADAPTER_OF = {
    "llava_onevision": LlavaOnevisionAdapter,
    "internvl": InternVLAdapter,
    "gemma3": Gemma3Adapter,
    "smolvlm": SmolVLMAdapter,
}
# The switch needs the teacher's vision encoder: the family student shares it (depth included).
SHARED_VISION = {"vision_layers": teacher_spec().vision_layers}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    reason = family_skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@functools.cache
def _tokenizer(family: str):
    return build_family_tokenizer(family)


@functools.cache
def _model(family: str, role: str, **overrides) -> nn.Module:
    spec = teacher_spec if role == "teacher" else student_spec
    return build_family_model(family, spec(**overrides), _tokenizer(family))


def _pair(family: str, **student_overrides) -> tuple[nn.Module, nn.Module]:
    """(student, teacher): fresh copies, the student training, the teacher frozen."""
    student = copy.deepcopy(_model(family, "student", **SHARED_VISION, **student_overrides))
    teacher = copy.deepcopy(_model(family, "teacher")).requires_grad_(False).eval()
    return student.train(), teacher


def _pathway_logits(model: nn.Module, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
    """What the engine computes for one model: logits [B, S, V], mask and labels [B, S]."""
    adapter = adapter_for(model)
    inputs = adapter.pathway_inputs(batch, adapter.project(adapter.vision_features(batch)))
    return adapter.lm_head(adapter.decode(inputs)), inputs.attention_mask.bool(), inputs.labels


def _shifted_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


# ------------------------------------------------------------------------------ host parity


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_adapter_reproduces_the_host_forward(family: str, padding_side: str) -> None:
    """vision_features -> project -> pathway_inputs -> decode -> lm_head gives the host's
    logits at every attended position, its loss and every parameter's gradient."""
    model = _model(family, "student")
    tokenizer = _tokenizer(family)
    batch = make_family_batch(family, model, tokenizer, n=3, padding_side=padding_side)
    assert isinstance(adapter_for(model), ADAPTER_OF[family])

    model.zero_grad()
    host = model(**batch)
    host.loss.backward()
    host_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    logits, mask, labels = _pathway_logits(model, batch)
    loss = _shifted_ce(logits, labels)
    loss.backward()

    # The spliced sequence is the host's, position for position (same padding too).
    assert torch.equal(mask, batch["attention_mask"].bool())
    assert torch.equal(labels, batch["labels"])
    hidden = adapter_for(model).lm_hidden_size
    assert_close(logits[mask], host.logits[mask], terms=hidden, name="logits")
    assert_close(loss, host.loss, terms=int((labels != IGNORE_INDEX).sum()), name="loss")
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    # Left padding shifts the host's rope positions (invariant only in exact arithmetic): the
    # same rounding, summed over every position of the batch.
    assert_same_gradients(grads, host_grads, terms=batch["input_ids"].numel())
    model.zero_grad()


def test_text_only_batch_is_the_hosts_with_no_switch_pass(family: str) -> None:
    """A batch without images (no image tokens, no pixel_values): the engine's CE is the
    host's loss, align is distilled, and no switch pass runs (the teacher's decoder runs once,
    counted by a hook) and no VSD row is counted."""
    student, teacher = _pair(family)
    tokenizer = _tokenizer(family)
    batch = make_family_batch(family, student, tokenizer, n=3, seed=2, text_only=True)
    assert "pixel_values" not in batch
    args = SwitchKDArguments(distill="switchkd", teacher_model_path="unused")
    engine = SwitchKDEngine(
        adapter_for(student),
        adapter_for(teacher),
        engine_options(args, len(tokenizer), run_switch=True),
    )
    calls: list[int] = []
    hook = engine.teacher.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        terms = engine(batch)
    finally:
        hook.remove()
    with torch.no_grad():
        host = student(**batch)
    rows = terms.response_tokens
    assert len(calls) == 1 and terms.vsd.item() == 0.0 and terms.vsd_tokens == 0
    assert terms.distilled_tokens == rows and terms.align.item() > 0
    assert "vsd" not in terms.k_stats
    assert_close(terms.ce, host.loss * rows, terms=rows, name="ce vs the host's loss")
    terms.loss.backward()


def test_text_only_rank_runs_the_image_ranks_vision_calls(family: str) -> None:
    """On several ranks a text-only micro-batch runs the family's placeholder image through both
    models' vision encoders and connectors, changing nothing (see the helper)."""
    student, teacher = _pair(family)
    tokenizer = _tokenizer(family)
    text = make_family_batch(family, student, tokenizer, n=3, seed=2, text_only=True)
    images = make_family_batch(family, student, tokenizer, n=3, seed=2)
    assert_text_only_rank_runs_the_image_ranks_calls(student, teacher, len(tokenizer), text, images)


def _transplant(model: nn.Module, ours: nn.Module, theirs: nn.Module) -> None:
    """Replace the submodule ``ours`` of ``model``'s inner model by a copy of ``theirs``."""
    parts = model.model
    name = next(name for name, child in parts.named_children() if child is ours)
    setattr(parts, name, copy.deepcopy(theirs))


@pytest.mark.parametrize("switch_point", ["vision", "connector"])
def test_switch_pathway_is_the_teacher_holding_the_student_modules(
    family: str, switch_point: str
) -> None:
    """The switch pass equals the host forward of a teacher whose vision encoder (and, at the
    connector switch point, connector) is the student's: so the switch enters exactly where
    the teacher's connector (or LM) starts, and the teacher's own packing follows."""
    wide = {"hidden_size": teacher_spec().hidden_size} if switch_point == "connector" else {}
    student, teacher = _pair(family, **wide)
    s, t = adapter_for(student), adapter_for(teacher)
    batch = make_family_batch(family, student, _tokenizer(family), n=3, seed=1)
    hybrid = copy.deepcopy(teacher)
    moved = [(adapter_for(hybrid).vision_module, s.vision_module)]
    if switch_point == "connector":
        moved.append((adapter_for(hybrid).connector, s.connector))
    for ours, theirs in moved:
        _transplant(hybrid, ours, theirs)
    with torch.no_grad():
        features = s.vision_features(batch)
        embeds = t.project(features) if switch_point == "vision" else s.project(features)
        inputs = t.pathway_inputs(batch, embeds)
        switch = t.lm_head(t.decode(inputs))
        host = hybrid(**batch).logits
    mask = inputs.attention_mask.bool()
    assert_close(switch[mask], host[mask], terms=t.lm_hidden_size, name="switch logits")
    teacher_alone = teacher(**batch).logits
    assert (teacher_alone[mask] - host[mask]).abs().max() > 1e-3  # the student's modules matter


def test_llava_onevision_multi_image_sample_reproduces_the_host() -> None:
    """A sample with two images (the host packs them without anyres crops) next to one with a
    single image: same logits as the host."""
    if reason := family_skip_reason("llava_onevision"):
        pytest.skip(reason)
    model = _model("llava_onevision", "student")
    batch = make_family_batch(
        "llava_onevision", model, _tokenizer("llava_onevision"), n=2, images_per_sample=[2, 1]
    )
    assert batch["batch_num_images"].tolist() == [2, 1]
    with torch.no_grad():
        host = model(**batch).logits
        logits, mask, _ = _pathway_logits(model, batch)
    assert_close(logits[mask], host[mask], terms=adapter_for(model).lm_hidden_size, name="logits")


def test_gemma3_image_tokens_attend_bidirectionally() -> None:
    """Without the token types (causal attention only) the image tokens' states change, so the
    parity above depends on reproducing the bidirectional mask."""
    if reason := family_skip_reason("gemma3"):
        pytest.skip(reason)
    model, tokenizer = _model("gemma3", "student"), _tokenizer("gemma3")
    batch = make_family_batch("gemma3", model, tokenizer, n=2)
    adapter = adapter_for(model)
    with torch.no_grad():
        inputs = adapter.pathway_inputs(batch, adapter.project(adapter.vision_features(batch)))
        assert torch.equal(inputs.decoder_kwargs["token_type_ids"], batch["token_type_ids"])
        bidirectional = adapter.decode(inputs)
        inputs.decoder_kwargs.clear()
        causal = adapter.decode(inputs)
    image = batch["token_type_ids"].bool()
    assert (bidirectional[image] - causal[image]).abs().max() > 1e-3
    # Text before the first image sees no image token either way.
    first_image = int(image[0].nonzero()[0])
    assert_close(
        bidirectional[0, :first_image], causal[0, :first_image], slack=0, name="text states"
    )


def test_adapters_claim_only_their_family(family: str) -> None:
    model = _model(family, "student")
    claiming = [adapter for adapter in ADAPTERS if adapter.supports(model)]
    assert claiming == [ADAPTER_OF[family]]


def test_image_token_count_mismatch_is_refused(family: str) -> None:
    model, tokenizer = _model(family, "student"), _tokenizer(family)
    batch = make_family_batch(family, model, tokenizer, n=2)
    adapter = adapter_for(model)
    with torch.no_grad():
        embeds = adapter.project(adapter.vision_features(batch))
        runs = adapter.image_runs(batch)
        image_id = adapter.image_token_id
        first = int((batch["input_ids"][0] == image_id).nonzero()[0])
        batch["input_ids"][0, first] = tokenizer.pad_token_id  # one image token fewer
        with pytest.raises(ValueError, match=rf"has {sum(runs) - 1} image tokens .* produced"):
            adapter.pathway_inputs(batch, embeds)


# ----------------------------------------------------------------------- training step


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("switch_point", ["vision", "connector"])
def test_vsd_alone_moves_only_the_student_vision_side(
    family: str, switch_point: str, tmp_path
) -> None:
    """--w_ce 0 --w_align 0: one SGD step changes the student's vision encoder (and, switching
    at the connector, its connector) and nothing else of it; the teacher stays bit-identical.
    The connector switch needs a student LM as wide as the teacher's."""
    wide = {"hidden_size": teacher_spec().hidden_size} if switch_point == "connector" else {}
    student, teacher = _pair(family, **wide)
    tokenizer = _tokenizer(family)
    batch = make_family_batch(family, student, tokenizer, n=2, seed=3)
    student_before, teacher_before = _state(student), _state(teacher)
    trainer = make_trainer(
        student,
        tokenizer,
        [batch],
        tmp_path,
        teacher=teacher,
        w_ce=0.0,
        w_align=0.0,
        w_vsd=1.0,
        switch_point=switch_point,
    )
    assert trainer._engine.run_switch
    trainer.train()
    assert trainer.state.log_history[0]["vsd"] > 0

    adapter = adapter_for(student)
    trained = [adapter.vision_module] + ([adapter.connector] if switch_point == "connector" else [])
    trained_ids = {id(p): index for index, m in enumerate(trained) for p in m.parameters()}
    moved = [False] * len(trained)
    for name, param in student.named_parameters():
        if id(param) in trained_ids:
            moved[trained_ids[id(param)]] |= not torch.equal(param, student_before[name])
        else:
            assert torch.equal(param, student_before[name]), f"the switch term moved {name}"
    assert all(moved)
    for name, param in teacher.named_parameters():
        assert torch.equal(param, teacher_before[name]), f"the teacher's {name} changed"


def test_padded_lm_heads_distil_the_shared_vocabulary(family: str, tmp_path, caplog) -> None:
    """A bf16 teacher whose lm_head is padded to a multiple of 64 rows, every term on: the
    terms compare the shared tokenizer vocabulary, and one step trains with finite terms."""
    student = copy.deepcopy(_model(family, "student", **SHARED_VISION)).train()
    teacher = copy.deepcopy(_model(family, "teacher", vocab_multiple_of=64))
    tokenizer = _tokenizer(family)
    vocab = len(tokenizer)
    assert adapter_for(teacher).lm_head.weight.shape[0] == 640 > vocab
    assert adapter_for(student).lm_head.weight.shape[0] == vocab
    batch = make_family_batch(family, student, tokenizer, n=2, seed=5)
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        # a bf16 teacher: the switch carries fp32 student features into it
        trainer = make_trainer(
            student, tokenizer, [batch], tmp_path, teacher=teacher, teacher_dtype="bfloat16"
        )
    assert f"shared tokenizer vocabulary of {vocab} tokens" in caplog.text
    assert trainer._engine.vocab == vocab
    trainer.train()
    log = trainer.state.log_history[0]
    for term in ("ce", "align", "vsd"):
        assert torch.isfinite(torch.tensor(log[term])) and log[term] > 0, term


# ------------------------------------------------------------------------------ pre-flight


def test_a_different_vision_encoder_is_refused_with_the_field_and_the_fix(
    family: str, tmp_path
) -> None:
    """A student whose vision encoder is shallower than the teacher's (same widths, so the
    shapes would fit): the pre-flight check names the field and the fixes; --w_vsd 0 runs."""
    student = copy.deepcopy(_model(family, "student")).train()  # 2 vision layers, teacher 3
    teacher = copy.deepcopy(_model(family, "teacher"))
    tokenizer = _tokenizer(family)
    with pytest.raises(ValueError) as excinfo:
        make_trainer(student, tokenizer, [], tmp_path, teacher=teacher)
    message = str(excinfo.value)
    assert "vision_config.num_hidden_layers is 2" in message and "teacher's is 3" in message
    assert "family line" in message and "--w_vsd 0" in message
    trainer = make_trainer(student, tokenizer, [], tmp_path, teacher=teacher, w_vsd=0.0)
    assert not trainer._engine.run_switch


def test_teacher_loads_from_its_directory_with_the_students_class(family: str, tmp_path) -> None:
    """--teacher_model_path: the saved teacher (and tokenizer) load with the student's class,
    weights intact, and a step runs."""
    student = copy.deepcopy(_model(family, "student", **SHARED_VISION)).train()
    teacher, tokenizer = _model(family, "teacher"), _tokenizer(family)
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    batch = make_family_batch(family, student, tokenizer, n=2, seed=6)
    trainer = make_trainer(
        student, tokenizer, [batch], tmp_path / "run", teacher_model_path=str(tmp_path / "teacher")
    )
    loaded = trainer.teacher
    assert type(loaded) is type(student) and not any(p.requires_grad for p in loaded.parameters())
    loaded_state, saved_state = loaded.state_dict(), teacher.state_dict()
    assert loaded_state.keys() == saved_state.keys()
    for name, value in loaded_state.items():
        assert torch.equal(value, saved_state[name]), name
    trainer.train()
    assert trainer.state.log_history[0]["vsd"] > 0


def test_gemma3_two_zero3_ranks_take_the_one_rank_step(tmp_path) -> None:
    """Gemma 3 (the host's own bidirectional-image masks in decode, a teacher sharded by its
    own DeepSpeed engine): 2 ZeRO-3 ranks with one micro-batch each move the student exactly
    like 1 plain rank accumulating both."""
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed (pip install -e '.[deepspeed]')")
    if reason := family_skip_reason("gemma3"):
        pytest.skip(reason)
    reference = _run(tmp_path, 1, None, family="gemma3")
    zero3 = _run(tmp_path, 2, 3, family="gemma3")
    start = _model("gemma3", "student", **SHARED_VISION).state_dict()
    assert_same_step(zero3, reference, start)
