"""The Switch-KD engine on real tiny VLMs: SFT parity, gradient routing, chunking, alignment."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from switchkd_plugin.adapters import HFLlavaAdapter, VLMAdapter, adapter_for
from switchkd_plugin.config import SwitchKDArguments
from switchkd_plugin.losses import dbild_loss
from switchkd_plugin.objective.engine import StepTerms, SwitchKDEngine
from switchkd_plugin.testing import (
    IGNORE_INDEX,
    build_hf_llava,
    build_tinyllava,
    make_host_batch,
    student_spec,
    teacher_spec,
)
from switchkd_plugin.testing.tensor_close import assert_close, assert_same_gradients
from switchkd_plugin.training.setup import engine_options


def _args(**overrides) -> SwitchKDArguments:
    return SwitchKDArguments(distill="switchkd", teacher_model_path="unused", **overrides)


def _engine(student, teacher, vocab: int, **overrides) -> SwitchKDEngine:
    args = _args(**overrides)
    teacher_adapter = adapter_for(teacher) if args.needs_teacher else None
    return SwitchKDEngine(
        adapter_for(student), teacher_adapter, engine_options(args, vocab, run_switch=True)
    )


def _grads(model: nn.Module) -> dict[str, Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _full_logits_rows(adapter: VLMAdapter, batch, image_embeds: Tensor) -> tuple[Tensor, Tensor]:
    """Slow reference: full `[B, S, V]` logits of one pathway, then its supervised rows."""
    inputs = adapter.build_inputs(
        batch["input_ids"], batch["attention_mask"], batch["labels"], image_embeds
    )
    logits = adapter.lm_head(adapter.decode(inputs))
    supervised = inputs.labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][supervised], inputs.labels[:, 1:][supervised]


def test_zero_distillation_weights_give_plain_sft(models, tiny_tokenizer):
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=3)
    student.zero_grad()
    host_loss = student(**batch).loss
    host_loss.backward()
    host_grads = _grads(student)

    for teacher_or_none in (teacher, None):  # weights 0 skip the teacher even when one is given
        engine = _engine(
            student, teacher_or_none or teacher, len(tiny_tokenizer), w_align=0.0, w_vsd=0.0
        )
        assert engine.teacher is None or not (engine.run_align or engine.run_switch)
        student.zero_grad()
        terms = engine(batch)
        loss = terms.loss / terms.response_tokens
        loss.backward()
        positions = batch["input_ids"].numel()
        assert_close(loss, host_loss, terms=terms.response_tokens, name="loss")
        assert_same_gradients(_grads(student), host_grads, terms=positions)
        assert terms.align is None and terms.vsd is None and terms.distilled_tokens == 0


def test_vsd_gradient_reaches_only_the_student_vision_encoder(models, tiny_tokenizer):
    student, teacher = models
    engine = _engine(student, teacher, len(tiny_tokenizer), w_ce=0.0, w_align=0.0, w_vsd=1.0)
    student.zero_grad()
    terms = engine(make_host_batch(student, tiny_tokenizer, n=2))
    assert terms.vsd.item() > 0 and terms.loss.item() == pytest.approx(terms.vsd.item())
    terms.loss.backward()
    vision = {id(p) for p in adapter_for(student).vision_module.parameters()}
    reached_vision = False
    for name, param in student.named_parameters():
        touched = param.grad is not None and param.grad.abs().max() > 0
        if id(param) in vision:
            reached_vision |= touched
        else:
            assert not touched, f"the switch term reached {name} outside the vision encoder"
    assert reached_vision
    assert all(p.grad is None for p in teacher.parameters())


def _wide_student(student: nn.Module, tokenizer, request) -> nn.Module:
    """A student of the same host whose LM width equals the teacher's (connector switching)."""
    spec = student_spec(name="student-wide", hidden_size=teacher_spec().hidden_size)
    if isinstance(adapter_for(student), HFLlavaAdapter):
        return build_hf_llava(spec, tokenizer)
    return build_tinyllava(spec, tokenizer, request.getfixturevalue("factory_workdir"))


@pytest.mark.parametrize("switch_point", ["vision", "connector"])
def test_engine_equals_full_logits_reference(models, tiny_tokenizer, switch_point, request):
    """Chunked response-only logits give the loss and gradients of full logits at those rows."""
    student, teacher = models
    if switch_point == "connector":
        student = _wide_student(student, tiny_tokenizer, request)
    s, t = adapter_for(student), adapter_for(teacher)
    batch = make_host_batch(student, tiny_tokenizer, n=3, seed=4)
    vocab = len(tiny_tokenizer)
    tau = 2.0

    student.zero_grad()
    features = s.encode_vision(batch[s.images_key])
    s_embeds = s.project(features)
    s_logits, targets = _full_logits_rows(s, batch, s_embeds)
    with torch.no_grad():
        t_embeds = t.project(t.encode_vision(batch[s.images_key]))
        t_logits, t_targets = _full_logits_rows(t, batch, t_embeds)
    switch_embeds = t.project(features) if switch_point == "vision" else s_embeds
    w_logits, w_targets = _full_logits_rows(t, batch, switch_embeds)
    assert torch.equal(targets, t_targets) and torch.equal(targets, w_targets)
    reference = (
        F.cross_entropy(s_logits, targets, reduction="sum")
        + 0.5
        * dbild_loss(s_logits[:, :vocab], t_logits[:, :vocab], temperature=tau, reduction="sum")
        + 2.0
        * dbild_loss(w_logits[:, :vocab], t_logits[:, :vocab], temperature=tau, reduction="sum")
    )
    reference.backward()
    reference_grads = _grads(student)

    for chunk in (0, 1, 4):
        student.zero_grad()
        engine = _engine(
            student,
            teacher,
            vocab,
            w_align=0.5,
            w_vsd=2.0,
            temperature=tau,
            lm_head_chunk_size=chunk,
            switch_point=switch_point,
        )
        terms = engine(batch)
        terms.loss.backward()
        assert_close(terms.loss, reference, terms=targets.numel(), name=f"loss, chunk {chunk}")
        assert terms.response_tokens == terms.distilled_tokens == targets.numel()
        # Every weight gradient sums over the batch's positions (image tokens included).
        positions = batch["input_ids"].numel() + features.shape[0] * features.shape[1]
        assert_same_gradients(_grads(student), reference_grads, terms=positions)


def test_pathways_with_different_image_token_counts_align_by_labels(hf_student, tiny_tokenizer):
    """A teacher whose vision selection drops one patch emits 15 image tokens, the student 16:
    the same text token sits at different positions, and rows still pair up by label."""
    student = copy.deepcopy(hf_student)
    teacher = build_hf_llava(teacher_spec(), tiny_tokenizer, select_strategy="default").eval()
    teacher.requires_grad_(False)
    s, t = adapter_for(student), adapter_for(teacher)
    batch = make_host_batch(student, tiny_tokenizer, n=2, seed=5)
    images = batch[s.images_key]
    s_count, t_count = s.encode_vision(images).shape[1], t.encode_vision(images).shape[1]
    assert s_count == t_count + 1
    vocab = len(tiny_tokenizer)

    s_logits, targets = _full_logits_rows(s, batch, s.project(s.encode_vision(images)))
    with torch.no_grad():
        t_logits, t_targets = _full_logits_rows(t, batch, t.project(t.encode_vision(images)))
    assert torch.equal(targets, t_targets)
    expected = dbild_loss(s_logits[:, :vocab], t_logits[:, :vocab], reduction="sum")
    terms = _engine(student, teacher, vocab, w_ce=0.0, w_vsd=0.0)(batch)
    assert_close(terms.align, expected.detach(), terms=targets.numel(), name="align")
    # Pairing raw positions instead of labels would compare shifted tokens: a different loss.
    misaligned = dbild_loss(s_logits[1:, :vocab], t_logits[:-1, :vocab], reduction="sum")
    assert not torch.isclose(misaligned, expected)


def test_batch_without_response_tokens_gives_zero_terms(models, tiny_tokenizer):
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=2)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    terms = _engine(student, teacher, len(tiny_tokenizer))(batch)
    assert terms.loss.item() == 0.0 and terms.response_tokens == 0
    terms.loss.backward()  # still connected: training goes on
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_teacher_layers_are_checkpointed_one_by_one_with_the_same_gradients(models, tiny_tokenizer):
    """Per-layer checkpointing: each teacher layer runs again in backward, on its own, and the
    loss and gradients are those of the plain switch pass; the layers' forwards are restored."""
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=2, seed=3)
    layers = adapter_for(teacher).decoder_layers
    calls: list[tuple[int, bool]] = []  # (layer, grad enabled) in call order of its MLP
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda module, args, i=i: calls.append((i, torch.is_grad_enabled()))
        )
        for i, layer in enumerate(layers)
    ]
    results = []
    for checkpointing in (False, True):
        student.zero_grad()
        engine = _engine(student, teacher, len(tiny_tokenizer), w_ce=0.0, w_align=0.0,
                         teacher_gradient_checkpointing=checkpointing)  # fmt: skip
        terms = engine(batch)
        forward_calls = len(calls)
        terms.loss.backward()
        results.append((terms.loss.detach(), _grads(student), calls[forward_calls:]))
        calls.clear()
    for hook in hooks:
        hook.remove()
    (plain_loss, plain_grads, plain_backward), (ckpt_loss, ckpt_grads, ckpt_backward) = results
    assert plain_backward == []
    # Backward recomputes the layers last to first, one checkpoint each.
    assert [i for i, _ in ckpt_backward] == list(reversed(range(len(layers))))
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert_close(ckpt_loss, plain_loss, slack=0, name="loss")  # the same forward: exact
    # Recomputation reruns the same kernels; only the backward's accumulation order may differ.
    assert_same_gradients(ckpt_grads, plain_grads, terms=batch["input_ids"].numel())


class _MatmulsReading(TorchDispatchMode):
    """Records the matrix products that read one tensor's storage (views of it included)."""

    def __init__(self, tensor: Tensor) -> None:
        super().__init__()
        self.storage, self.names = tensor.untyped_storage().data_ptr(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "bmm", "matmul") and any(
            isinstance(t, Tensor) and t.untyped_storage().data_ptr() == self.storage
            for t in tree_leaves((args, kwargs))
        ):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def test_every_lm_head_runs_once_per_chunk_in_forward_and_never_in_backward(
    hf_student, hf_teacher, tiny_tokenizer
):
    """With several chunks, each chunk's gradient is taken in forward: the student's lm_head
    weight is read by two products per chunk (its logits, and the rows' gradient: the head's
    backward is written out, `loss_stage.py`), the teacher's lm_head runs twice per chunk (its
    no-grad rows, the switch rows); backward reads neither head again. Align and VSD share one
    teacher-led top-k."""
    student, teacher = copy.deepcopy(hf_student), hf_teacher
    batch = make_host_batch(student, tiny_tokenizer, n=3, seed=4)
    calls = []  # (teacher head, grad enabled)
    hook = adapter_for(teacher).lm_head.register_forward_pre_hook(
        lambda module, args: calls.append(("teacher", torch.is_grad_enabled()))
    )
    engine = _engine(student, teacher, len(tiny_tokenizer), lm_head_chunk_size=8)
    assert engine.shared_teacher_rule is not None
    student_head = _MatmulsReading(adapter_for(student).lm_head.weight)
    with student_head:
        terms = engine(batch)
    chunks = -(-terms.response_tokens // 8)
    assert chunks > 1
    expected = [("teacher", False), ("teacher", True)] * chunks
    assert calls == expected
    assert len(student_head.names) == 2 * chunks, student_head.names
    in_backward = _MatmulsReading(adapter_for(student).lm_head.weight)
    with in_backward:
        terms.loss.backward()
    hook.remove()
    assert calls == expected  # nothing ran again in backward
    assert in_backward.names == []


# --------------------------------------------------------------------------- text-only samples


def _one_sample(adapter: VLMAdapter, batch: dict, b: int) -> dict:
    """Sample `b` of a collated batch alone (right padding: extra pad columns change nothing),
    with its image: TinyLLaVA holds one per sample (a zero one when text-only), HF LLaVA one
    per image sample."""
    key, rows = adapter.images_key, batch["input_ids"].shape[0]
    out = {name: value[b : b + 1] for name, value in batch.items() if name != key}
    images, with_image = batch.get(key), adapter.image_samples(batch)
    if images is not None and images.shape[0] == rows:
        out[key] = images[b : b + 1]
    elif with_image[b]:
        index = int(with_image[:b].sum())
        out[key] = images[index : index + 1]
    return out


TEXT_ONLY = {"mixed": (1,), "text-only": (0, 1, 2)}


def assert_sum_of_samples_alone(
    engine: SwitchKDEngine, student: nn.Module, batch: dict, sample: Callable[[int], dict]
) -> StepTerms:
    """The engine on `batch` equals the sum of its samples run alone (`sample(b)`: sample b's
    batch): every term and gradient; CE is the host forward's; VSD (sum, rows, k statistics)
    comes from the image samples only, and a text-only sample alone has none."""
    with_image = engine.teacher.image_samples(batch)
    student.zero_grad()
    terms = engine(batch)
    terms.loss.backward()
    grads = _grads(student)
    with torch.no_grad():
        host = student(**batch)

    parts = []
    for b in range(batch["input_ids"].shape[0]):
        student.zero_grad()
        part = engine(sample(b))
        part.loss.backward()
        parts.append((part, _grads(student)))
        if not with_image[b]:  # the switch pass did not run: no VSD rows
            assert part.vsd.item() == 0.0 and part.vsd_tokens == 0 and "vsd" not in part.k_stats
    rows = terms.response_tokens
    assert rows == sum(part.response_tokens for part, _ in parts) == terms.distilled_tokens
    image_rows = sum(
        part.response_tokens for (part, _), b in zip(parts, with_image, strict=True) if b
    )
    assert terms.vsd_tokens == image_rows
    if image_rows:
        assert terms.k_stats["vsd"].teacher_k.numel() == image_rows
    else:
        assert "vsd" not in terms.k_stats
    for name in ("loss", "ce", "align", "vsd"):
        expected = torch.stack([getattr(part, name) for part, _ in parts]).sum()
        assert_close(getattr(terms, name).detach(), expected.detach(), terms=rows, name=name)
    assert_close(terms.ce, host.loss * rows, terms=rows, name="ce vs the host's loss")
    expected_grads = {
        name: None if all(g[name] is None for _, g in parts)
        else sum(g[name] for _, g in parts if g[name] is not None)
        for name in grads
    }  # fmt: skip
    assert_same_gradients(grads, expected_grads, terms=batch["input_ids"].numel())
    return terms


@pytest.mark.parametrize("layout", sorted(TEXT_ONLY))
def test_text_only_samples_equal_the_per_sample_reference(models, tiny_tokenizer, layout):
    """A batch with text-only samples (no image token; TinyLLaVA's carry the Factory's zero
    image): the sum of its samples run alone, VSD from the image samples only (a text-only
    sample's switch rows would be its teacher rows: VSD 0)."""
    student, teacher = models
    batch = make_host_batch(student, tiny_tokenizer, n=3, seed=6, text_only_rows=TEXT_ONLY[layout])
    engine = _engine(student, teacher, len(tiny_tokenizer), w_align=0.5, w_vsd=2.0,
                     lm_head_chunk_size=8)  # fmt: skip
    with_image = engine.student.image_samples(batch)
    assert with_image.tolist() == [b not in TEXT_ONLY[layout] for b in range(3)]
    terms = assert_sum_of_samples_alone(
        engine, student, batch, lambda b: _one_sample(engine.student, batch, b)
    )
    assert terms.vsd_tokens < terms.distilled_tokens


def test_switch_pass_runs_on_the_image_samples_only(models, tiny_tokenizer):
    """Counted by a forward hook on the teacher's decoder: a text-only batch runs the teacher
    pass only (no switch pass); a mixed batch runs the switch pass on its image samples."""
    student, teacher = models
    decoder_batches: list[int] = []
    hook = adapter_for(teacher).decoder.register_forward_pre_hook(
        lambda module, args, kwargs: decoder_batches.append(kwargs["inputs_embeds"].shape[0]),
        with_kwargs=True,
    )
    engine = _engine(student, teacher, len(tiny_tokenizer))
    try:
        for text_only, expected in (((0, 1, 2), [3]), ((1,), [3, 2]), ((), [3, 3])):
            decoder_batches.clear()
            batch = make_host_batch(student, tiny_tokenizer, n=3, seed=2, text_only_rows=text_only)
            terms = engine(batch)
            assert decoder_batches == expected, text_only
            terms.loss.backward()
    finally:
        hook.remove()


def test_trainer_trains_on_text_only_batches(hf_student, hf_teacher, tiny_tokenizer, tmp_path):
    """HF LLaVA through SwitchKDTrainer.train(): an all-text batch (no pixel_values) and a mixed
    one beside an image batch; the text-only step logs vsd 0 over 0 VSD rows, the mixed one
    the VSD mean over its image samples' rows."""
    from switchkd_plugin.testing.trainer import make_trainer

    student, teacher = copy.deepcopy(hf_student).train(), hf_teacher
    batches = [
        make_host_batch(student, tiny_tokenizer, n=3, seed=1, text_only_rows=rows)
        for rows in ((0, 1, 2), (1,), ())
    ]
    assert "pixel_values" not in batches[0]
    trainer = make_trainer(student, tiny_tokenizer, batches, tmp_path, teacher=teacher,
                       training={"max_steps": 3})  # fmt: skip
    trainer.train()
    logs = [e for e in trainer.state.log_history if "ce" in e]  # the sampler shuffles
    text_only, mixed, images = sorted(logs, key=lambda entry: entry["vsd_tokens"])
    assert text_only["vsd"] == 0.0 and text_only["vsd_tokens"] == 0
    assert text_only["distilled_tokens"] > 0 and "vsd_k_teacher_mean" not in text_only
    assert 0 < mixed["vsd_tokens"] < mixed["distilled_tokens"] and mixed["vsd"] > 0
    assert images["vsd_tokens"] == images["distilled_tokens"]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history[:3])


# ------------------------------------------------------- text-only micro-batches on several ranks


def assert_placeholder_goes_through(*adapters: VLMAdapter) -> None:
    """Each adapter's `placeholder_images` (one blank image in its host's layout) goes through
    its `vision_features` and `project`, and through the next adapter's `project` (the
    switch). Their values are checked through the engine (`0 * NaN` would change the loss)."""
    features = [adapter.vision_features(adapter.placeholder_images()) for adapter in adapters]
    for adapter, own, other in zip(adapters, features, features[1:] + features[:1], strict=True):
        assert own is not None
        assert adapter.project(own) is not None and adapter.project(other) is not None


def assert_text_only_rank_runs_the_image_ranks_calls(
    student: nn.Module, teacher: nn.Module, vocab: int, text_batch: dict, image_batch: dict
) -> None:
    """A text-only micro-batch on one of several ranks (simulated: `agree_chunks` is the
    all-reduce max with a rank that has images) calls each vision encoder and connector as
    often as an image micro-batch does (the teacher's connector in the switch pass too), its
    backward reaches every student connector parameter (a zero gradient), and its terms and
    gradients are the one-rank run's."""
    assert "pixel_values" not in text_batch
    args = _args(w_align=0.5, w_vsd=2.0)
    pair = adapter_for(student), adapter_for(teacher)
    options = engine_options(args, vocab, run_switch=True)
    one_rank = SwitchKDEngine(*pair, options)
    ranks = SwitchKDEngine(*pair, options, agree_chunks=lambda n: max(n, 1))
    assert_placeholder_goes_through(*pair)
    modules = [module for adapter in pair for module in (adapter.vision_module, adapter.connector)]
    calls = dict.fromkeys(range(len(modules)), 0)
    hooks = [
        module.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, module in enumerate(modules)
    ]
    try:
        runs = []
        for engine, batch in ((ranks, image_batch), (ranks, text_batch), (one_rank, text_batch)):
            calls.update(dict.fromkeys(calls, 0))
            student.zero_grad()
            terms = engine(batch)
            terms.loss.backward()
            reached = [p.grad is not None for p in pair[0].connector.parameters()]
            runs.append((dict(calls), terms, _grads(student), all(reached)))
    finally:
        for hook in hooks:
            hook.remove()
    (image_calls, *_), (text_calls, terms, grads, reached), (_, expected, expected_grads, _) = runs
    assert text_calls == image_calls and min(image_calls.values()) > 0, (text_calls, image_calls)
    assert reached, "backward did not reach every student connector parameter"
    rows = terms.response_tokens
    for name in ("loss", "ce", "align", "vsd"):
        assert_close(getattr(terms, name), getattr(expected, name), terms=rows, name=name)
    assert_same_gradients(grads, expected_grads, terms=text_batch["input_ids"].numel())


def test_placeholder_image_goes_through_both_hosts(models):
    """HF LLaVA and TinyLLaVA (whose Factory batches never need it: each sample has an image)."""
    assert_placeholder_goes_through(*(adapter_for(model) for model in models))


def test_text_only_rank_runs_the_image_ranks_vision_calls(hf_student, hf_teacher, tiny_tokenizer):
    """HF LLaVA: see `assert_text_only_rank_runs_the_image_ranks_calls`."""
    student = copy.deepcopy(hf_student).train()
    text = make_host_batch(student, tiny_tokenizer, n=3, seed=4, text_only_rows=(0, 1, 2))
    images = make_host_batch(student, tiny_tokenizer, n=3, seed=4)
    assert_text_only_rank_runs_the_image_ranks_calls(
        student, hf_teacher, len(tiny_tokenizer), text, images
    )
