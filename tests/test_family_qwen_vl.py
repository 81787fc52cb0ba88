"""Qwen2.5-VL and Qwen3-VL: host parity, the visual switch into the teacher's merger (and its
deepstack mergers), one Switch-KD step through the Trainer, pre-flight checks, padded lm_heads.

Tiny offline models built from configs (switchkd_plugin.testing.qwen_vl); batches as the Qwen
processor makes them.
"""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_engine import (
    assert_sum_of_samples_alone,
    assert_text_only_rank_runs_the_image_ranks_calls,
)
from test_trainer_dp import HAS_DEEPSPEED, OLD_ZERO3, _run
from torch import Tensor, nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.losses import dbild_loss
from switchkd_plugin.objective.engine import SwitchKDEngine
from switchkd_plugin.testing import IGNORE_INDEX, student_spec, teacher_spec
from switchkd_plugin.testing import qwen_vl as qwen
from switchkd_plugin.testing.tensor_close import assert_close, assert_same_gradients
from switchkd_plugin.testing.trainer import assert_same_step, make_trainer
from switchkd_plugin.training.setup import engine_options

HOST_CLASSES = {
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}


@pytest.fixture(params=sorted(HOST_CLASSES))
def family(request: pytest.FixtureRequest) -> str:
    if not hasattr(transformers, HOST_CLASSES[request.param]):
        pytest.skip(f"transformers {transformers.__version__} has no {HOST_CLASSES[request.param]}")
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    return qwen.build_qwen_vl_tokenizer()


@pytest.fixture
def pair(family, tokenizer) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) of one family line, teacher frozen. Both start from the line's shared
    ViT weights; the student's ViT has since drifted (seeded noise), as during training, so the
    switch differs from the teacher."""
    teacher = qwen.build_qwen_vl(family, teacher_spec(), tokenizer).eval()
    return _drifted_student(family, tokenizer), teacher.requires_grad_(False)


def _drifted_student(family: str, tokenizer, **spec) -> nn.Module:
    """A student of the line whose ViT has moved away from the shared weights."""
    student = qwen.build_qwen_vl(family, student_spec(**spec), tokenizer).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name in _vit_names(student):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return student


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _supervised(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """logits [B, S, V], labels [B, S] -> rows predicting a supervised token [n, V], targets [n]."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask], labels[:, 1:][mask]


def _vit_names(model: nn.Module) -> set[str]:
    """The ViT's parameters (the merger and deepstack mergers are the connector)."""
    return {
        name
        for name, _ in model.named_parameters()
        if name.startswith("model.visual.") and "merger" not in name
    }


HIDDEN = teacher_spec().intermediate_size  # the longest reduction of a layer (tolerances)


# ------------------------------------------------------------------------------- host parity


@pytest.mark.parametrize(
    ("padding_side", "text_only_rows"),
    [("right", ()), ("left", ()), ("right", (1,))],
    ids=["right", "left", "text-only-row"],
)
def test_adapter_reproduces_host_logits_loss_and_gradients(
    pair, tokenizer, padding_side, text_only_rows
):
    student, _ = pair
    batch = qwen.make_qwen_vl_batch(
        tokenizer, n=3, seed=1, padding_side=padding_side, text_only_rows=text_only_rows
    )
    student.zero_grad()
    host = student(**batch)
    host.loss.backward()
    host_grads = _grads(student)

    student.zero_grad()
    adapter = adapter_for(student)
    inputs = adapter.pathway_inputs(batch, adapter.project(adapter.vision_features(batch)))
    logits = adapter.lm_head(adapter.decode(inputs))
    rows, targets = _supervised(logits, inputs.labels)
    loss = F.cross_entropy(rows, targets)
    loss.backward()

    mask = batch["attention_mask"].bool()
    assert_close(logits[mask], host.logits[mask], terms=HIDDEN, name="logits")
    assert_close(loss, host.loss, terms=targets.numel(), name="loss")
    assert_same_gradients(_grads(student), host_grads, terms=batch["input_ids"].numel())


def test_window_order_and_deepstack_reach_the_logits(pair, family, tokenizer):
    """What the parity test relies on: Qwen2.5-VL's tokens really are window-ordered (dropping
    the reorder changes the logits); Qwen3-VL's deepstack features really reach the LM."""
    student, _ = pair
    adapter = adapter_for(student)
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2)
    with torch.no_grad():
        features = adapter.vision_features(batch)
        embeds = adapter.project(features)
        reference = adapter.decode(adapter.pathway_inputs(batch, embeds))
        if family == "qwen2_5_vl":
            order = features.window_index
            assert not torch.equal(order, torch.arange(order.numel()))
            changed = copy.copy(features)
            changed.window_index = None
        else:
            assert len(features.deepstack) == 1
            changed = copy.copy(features)
            changed.deepstack = (torch.zeros_like(features.deepstack[0]),)
        other = adapter.decode(adapter.pathway_inputs(batch, adapter.project(changed)))
    assert (other - reference).abs().max() > 1e-3


# ------------------------------------------------------------------------ engine vs the host


def test_a_shared_vit_makes_the_switch_the_teacher(family, tokenizer):
    """Student and teacher built on the line's shared ViT weights: the switch pathway (student
    ViT -> teacher merger and deepstack mergers -> teacher LM) is the teacher's own pathway, and
    the VSD term is 0 at the first step."""
    student = qwen.build_qwen_vl(family, student_spec(), tokenizer)
    teacher = qwen.build_qwen_vl(family, teacher_spec(), tokenizer).requires_grad_(False)
    s, t = adapter_for(student), adapter_for(teacher)
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2, seed=4)
    with torch.no_grad():
        own = t.decode(t.pathway_inputs(batch, t.project(t.vision_features(batch))))
        switched = t.decode(t.pathway_inputs(batch, t.project(s.vision_features(batch))))
    assert_close(switched, own, terms=HIDDEN, name="switch vs teacher states")
    args = SwitchKDArguments(distill="switchkd", teacher_model_path="unused", w_ce=0.0)
    terms = SwitchKDEngine(s, t, engine_options(args, len(tokenizer), run_switch=True))(batch)
    assert abs(terms.vsd.item()) < 1e-6 < terms.align.item()


def _switch_host(student: nn.Module, teacher: nn.Module, switch_point: str) -> nn.Module:
    """The switch pathway as a host model: the teacher holding the student's ViT (patch
    embedding, positions, blocks) and, for the connector switch point, its mergers too."""
    switched = _switched_names(student, switch_point)
    switch = copy.deepcopy(teacher).requires_grad_(True)
    state = {
        name[len("model.visual.") :]: value
        for name, value in student.state_dict().items()
        if name in switched
    }
    switch.model.visual.load_state_dict(state, strict=False)
    return switch


def _switched_names(student: nn.Module, switch_point: str) -> set[str]:
    if switch_point == "vision":
        return _vit_names(student)
    return {name for name, _ in student.named_parameters() if name.startswith("model.visual.")}


@pytest.mark.parametrize("switch_point", ["vision", "connector"])
def test_engine_equals_the_hosts_three_pathways(pair, family, tokenizer, switch_point):
    """loss = CE(z_S) + 0.5 DBiLD(z_S, z_T) + 2 DBiLD(z_W, z_T) with every z from a host
    forward (z_W: the teacher holding the student's ViT, or its whole vision model for the
    connector switch, whose student LM is as wide as the teacher's), and the same student
    gradients."""
    student, teacher = pair
    if switch_point == "connector":
        student = _drifted_student(family, tokenizer, hidden_size=teacher_spec().hidden_size)
    batch = qwen.make_qwen_vl_batch(tokenizer, n=3, seed=2)
    vocab, tau = len(tokenizer), 2.0
    switch = _switch_host(student, teacher, switch_point)

    student.zero_grad()
    s_rows, targets = _supervised(student(**batch).logits, batch["labels"])
    w_rows, _ = _supervised(switch(**batch).logits, batch["labels"])
    with torch.no_grad():
        t_rows, _ = _supervised(teacher(**batch).logits, batch["labels"])
    align = dbild_loss(s_rows[:, :vocab], t_rows[:, :vocab], temperature=tau, reduction="sum")
    vsd = dbild_loss(w_rows[:, :vocab], t_rows[:, :vocab], temperature=tau, reduction="sum")
    reference = F.cross_entropy(s_rows, targets, reduction="sum") + 0.5 * align + 2.0 * vsd
    reference.backward()
    expected = _grads(student)
    for name in _switched_names(student, switch_point):  # the switch's gradient
        extra = dict(switch.named_parameters())[name].grad
        expected[name] = extra if expected[name] is None else expected[name] + extra

    args = SwitchKDArguments(
        distill="switchkd",
        teacher_model_path="unused",
        w_align=0.5,
        w_vsd=2.0,
        temperature=tau,
        switch_point=switch_point,
    )
    engine = SwitchKDEngine(
        adapter_for(student), adapter_for(teacher), engine_options(args, vocab, run_switch=True)
    )
    student.zero_grad()
    terms = engine(batch)
    terms.loss.backward()
    assert terms.response_tokens == terms.distilled_tokens == targets.numel()
    rows = targets.numel()
    assert_close(terms.align, align.detach(), terms=rows, name="align")
    assert_close(terms.vsd, vsd.detach(), terms=rows, name="vsd")
    assert_close(terms.loss, reference.detach(), terms=rows, name="loss")
    assert_same_gradients(_grads(student), expected, terms=batch["input_ids"].numel())
    assert all(p.grad is None for p in teacher.parameters())


def _qwen_sample(adapter, batch: dict, b: int) -> dict:
    """Sample `b` of a Qwen batch alone, with its image's patches and grid."""
    keys = ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
    out = {key: batch[key][b : b + 1] for key in keys}
    with_image = adapter.image_samples(batch)
    if with_image[b]:
        index = int(with_image[:b].sum())
        patches = batch["image_grid_thw"].prod(-1)
        start = int(patches[:index].sum())
        out["pixel_values"] = batch["pixel_values"][start : start + int(patches[index])]
        out["image_grid_thw"] = batch["image_grid_thw"][index : index + 1]
    return out


@pytest.mark.parametrize("text_only_rows", [(1,), (0, 1, 2)], ids=["mixed", "text-only"])
def test_text_only_samples_equal_the_per_sample_reference(pair, tokenizer, text_only_rows):
    """A mixed batch and a text-only one: every term and gradient is the sum of the samples
    run alone, CE the host's, VSD from the image samples only; the switch pass runs on the
    image samples only (none for the text-only batch), counted on the teacher's decoder."""
    student, teacher = pair
    batch = qwen.make_qwen_vl_batch(tokenizer, n=3, seed=3, text_only_rows=text_only_rows)
    args = SwitchKDArguments(
        distill="switchkd", teacher_model_path="unused", w_align=0.5, w_vsd=2.0
    )
    engine = SwitchKDEngine(
        adapter_for(student),
        adapter_for(teacher),
        engine_options(args, len(tokenizer), run_switch=True),
    )
    decoder_batches: list[int] = []
    hook = engine.teacher.decoder.register_forward_pre_hook(
        lambda module, args, kwargs: decoder_batches.append(kwargs["inputs_embeds"].shape[0]),
        with_kwargs=True,
    )
    try:
        engine(batch)
        images = 3 - len(text_only_rows)
        assert decoder_batches == [3] + ([images] if images else [])
        assert_sum_of_samples_alone(
            engine, student, batch, lambda b: _qwen_sample(engine.student, batch, b)
        )
    finally:
        hook.remove()


def test_text_only_rank_runs_the_image_ranks_vision_calls(pair, tokenizer):
    """On several ranks a text-only micro-batch runs the smallest-grid placeholder image
    through both models' ViTs and mergers (Qwen3-VL: deepstack mergers too), changing nothing."""
    student, teacher = pair
    text = qwen.make_qwen_vl_batch(tokenizer, n=3, seed=3, text_only_rows=(0, 1, 2))
    images = qwen.make_qwen_vl_batch(tokenizer, n=3, seed=3)
    assert_text_only_rank_runs_the_image_ranks_calls(student, teacher, len(tokenizer), text, images)


def test_vsd_step_moves_only_the_student_vit_and_never_the_teacher(pair, tokenizer, tmp_path):
    """One SwitchKDTrainer step with VSD alone (--w_ce 0 --w_align 0)."""
    student, teacher = pair
    before_student = copy.deepcopy(student.state_dict())
    before_teacher = copy.deepcopy(teacher.state_dict())
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2, seed=3)
    trainer = make_trainer(
        student, tokenizer, [batch], tmp_path, teacher=teacher, w_ce=0.0, w_align=0.0
    )
    trainer.train()
    assert trainer.state.log_history[0]["vsd"] > 0
    vit = _vit_names(student)
    moved = {n for n, p in student.state_dict().items() if not torch.equal(p, before_student[n])}
    assert moved and moved <= vit, f"moved outside the ViT: {sorted(moved - vit)}"
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before_teacher[name]), f"teacher weight {name} changed"


# ------------------------------------------------------------------------ pre-flight checks


@pytest.mark.parametrize(
    ("field", "change"),
    [("depth", {"depth": 3}), ("spatial_merge_size", {"spatial_merge_size": 1})],
)
def test_different_vision_encoders_are_refused_naming_the_field(
    family, tokenizer, tmp_path, field, change
):
    student = qwen.build_qwen_vl(family, student_spec(), tokenizer)
    vision = qwen.QwenVisionSpec(**change)
    teacher = qwen.build_qwen_vl(family, teacher_spec(), tokenizer, vision)
    with pytest.raises(ValueError, match=rf"vision_config\.{field}.*--w_vsd 0"):
        make_trainer(student, tokenizer, [], tmp_path, teacher=teacher)
    # without the switch the same pair distils (align only)
    trainer = make_trainer(student, tokenizer, [], tmp_path, teacher=teacher, w_vsd=0.0)
    assert trainer._engine.run_align and not trainer._engine.run_switch


@pytest.mark.parametrize("w_vsd", [1.0, 0.0])
def test_a_teacher_of_another_model_type_is_refused_before_loading(
    tokenizer, tmp_path, caplog, w_vsd
):
    """A Qwen3-VL teacher for a Qwen2.5-VL student: loaded with the student's class, most of its
    weights would stay random. Refused before any weight is read, the model types named first
    (not a vision-config field), with or without the switch; as a model object too."""
    if not all(hasattr(transformers, name) for name in HOST_CLASSES.values()):
        pytest.skip(f"transformers {transformers.__version__} lacks Qwen2.5-VL or Qwen3-VL")
    student = qwen.build_qwen_vl("qwen2_5_vl", student_spec(), tokenizer)
    teacher = qwen.build_qwen_vl("qwen3_vl", teacher_spec(), tokenizer)
    saved = tmp_path / "qwen3-vl-teacher"
    teacher.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    types = (
        "is a qwen3_vl model (Qwen3VLForConditionalGeneration) but the student is qwen2_5_vl "
        "(Qwen2_5_VLForConditionalGeneration)"
    )
    logs = caplog.at_level(logging.INFO, logger="switchkd_plugin")
    with logs, pytest.raises(ValueError) as refused:
        make_trainer(student, tokenizer, [], tmp_path / "run", teacher_model_path=str(saved),
                 w_vsd=w_vsd)  # fmt: skip
    assert str(refused.value).startswith(f"the teacher at {saved} {types}"), refused.value
    assert "loading the teacher" not in caplog.text  # refused before from_pretrained
    with pytest.raises(ValueError, match=rf"^the teacher_model {re.escape(types)}"):
        make_trainer(student, tokenizer, [], tmp_path / "run", teacher=teacher, w_vsd=w_vsd)


def test_batch_problems_are_named(pair, tokenizer):
    student, _ = pair
    adapter = adapter_for(student)
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2)
    features = adapter.project(adapter.vision_features(batch))
    without_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError, match="no 'mm_token_type_ids'"):
        adapter.pathway_inputs(without_types, features)
    patches = int(batch["image_grid_thw"][0].prod())
    fewer = dict(
        batch,
        image_grid_thw=batch["image_grid_thw"][:1],
        pixel_values=batch["pixel_values"][:patches],
    )
    with pytest.raises(ValueError, match=r"32 image tokens .* 16 merged tokens"):
        adapter.pathway_inputs(batch, adapter.project(adapter.vision_features(fewer)))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        adapter.vision_features(dict(batch, pixel_values_videos=batch["pixel_values"]))


def test_padded_lm_heads_over_one_tokenizer_distil_the_shared_vocabulary(
    family, tokenizer, tmp_path, caplog
):
    """As Qwen2.5-VL 3B (151,936 rows) and 7B (152,064 rows) over one 151,665-token tokenizer."""
    student = qwen.build_qwen_vl(family, student_spec(vocab_multiple_of=8), tokenizer)
    teacher = qwen.build_qwen_vl(family, teacher_spec(vocab_multiple_of=64), tokenizer)
    rows = [adapter_for(m).lm_head.weight.shape[0] for m in (student, teacher)]
    assert len(tokenizer) < rows[0] < rows[1]
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2)
    with caplog.at_level(logging.WARNING, logger="switchkd_plugin"):
        trainer = make_trainer(student, tokenizer, [batch], tmp_path, teacher=teacher.eval())
    assert f"shared tokenizer vocabulary of {len(tokenizer)} tokens" in caplog.text
    assert trainer._engine.vocab == len(tokenizer)
    trainer.train()
    assert all(torch.isfinite(torch.tensor(e["total"])) for e in trainer.state.log_history[:1])


def test_two_zero3_ranks_take_the_one_rank_step(tmp_path):
    """Qwen2.5-VL through DeepSpeed ZeRO-3 on 2 ranks (one micro-batch each, the teacher
    sharded) moves the student exactly like 1 plain rank accumulating both micro-batches."""
    if not hasattr(transformers, HOST_CLASSES["qwen2_5_vl"]):
        pytest.skip(f"transformers {transformers.__version__} has no Qwen2.5-VL")
    if not HAS_DEEPSPEED or OLD_ZERO3:
        pytest.skip("needs deepspeed >= 0.15.4 (pip install -e '.[deepspeed]')")
    initial = qwen.build_qwen_vl("qwen2_5_vl", student_spec(), qwen.build_qwen_vl_tokenizer())
    reference = _run(tmp_path, 1, None, family="qwen2_5_vl")
    zero3 = _run(tmp_path, 2, 3, family="qwen2_5_vl")
    assert_same_step(zero3, reference, initial.state_dict())


def test_teacher_gradient_checkpointing_keeps_the_deepstack_gradient(pair, tokenizer):
    """Recomputing the teacher decoder in backward (--teacher_gradient_checkpointing) gives the
    switch's gradients, including what reaches the ViT through Qwen3-VL's deepstack features."""
    student, teacher = pair
    batch = qwen.make_qwen_vl_batch(tokenizer, n=2, seed=5)
    results = []
    for checkpointing in (False, True):
        args = SwitchKDArguments(
            distill="switchkd",
            teacher_model_path="unused",
            w_ce=0.0,
            w_align=0.0,
            teacher_gradient_checkpointing=checkpointing,
        )
        student.zero_grad()
        engine = SwitchKDEngine(
            adapter_for(student),
            adapter_for(teacher),
            engine_options(args, len(tokenizer), run_switch=True),
        )
        engine(batch).loss.backward()
        results.append({name: _grads(student)[name] for name in _vit_names(student)})
    plain, recomputed = results
    assert any(grad is not None and grad.abs().max() > 0 for grad in plain.values())
    assert_same_gradients(recomputed, plain, terms=batch["input_ids"].numel())
