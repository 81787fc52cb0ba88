"""The loss stage's gradient-in-forward chunk loop against plain autograd on the same sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from switchkd_plugin.objective.loss_stage import chunked_loss
from switchkd_plugin.testing.tensor_close import assert_close, tolerance

N, H_S, H_T, V = 13, 8, 12, 40


class ScaledHead(nn.Linear):
    """A head whose forward is not `F.linear` (as a wrapped or custom head): autograd's path."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def _setup(seed: int, head_kind: str = "tied"):
    """Student rows and switch rows from small differentiable producers, a student head (tied
    to an embedding used elsewhere in the graph, with a bias, as Qwen2.5-0.5B's is tied), a
    frozen teacher head."""
    torch.manual_seed(seed)
    embed = nn.Embedding(V, H_S)
    if head_kind == "custom":
        student_head = ScaledHead(H_S, V, bias=True)
    else:
        student_head = nn.Linear(H_S, V, bias=head_kind == "tied")
    if head_kind in ("tied", "custom"):
        student_head.weight = embed.weight
    teacher_head = nn.Linear(H_T, V, bias=False).requires_grad_(False)
    producer = nn.Linear(H_S, H_T)
    tokens = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))
    return embed, student_head, teacher_head, producer, tokens, targets


def _rows(embed, producer, tokens):
    student_rows = torch.tanh(embed(tokens))  # [N, H_S]
    return student_rows, producer(student_rows)  # [N, H_T]


def _terms(teacher_head, targets):
    def chunk_terms(student_logits, switch_rows, part):
        switch_logits = teacher_head(switch_rows)
        ce = F.cross_entropy(student_logits.float(), targets[part], reduction="sum")
        pull = (switch_logits.float().log_softmax(-1) * student_logits.detach().softmax(-1)).sum()
        loss = ce - 0.5 * pull
        return loss, (ce.detach(), part)

    return chunk_terms


def _parameters(embed, student_head, producer) -> dict[str, torch.Tensor]:
    named = {"embed": embed.weight, "head weight": student_head.weight}
    if student_head.bias is not None:
        named["head bias"] = student_head.bias
    named.update({f"producer {n}": p for n, p in producer.named_parameters()})
    return {name: p for name, p in named.items() if p.requires_grad}


def _reference_and_chunked(seed, head_kind, chunk_size, chunks, scale=0.37, frozen_head=False):
    """Every gradient of `scale * loss`, by plain autograd on the unchunked sum and by
    `chunked_loss`; the loss of each."""
    embed, student_head, teacher_head, producer, tokens, targets = _setup(seed, head_kind)
    student_head.requires_grad_(not frozen_head)
    terms = _terms(teacher_head, targets)
    params = _parameters(embed, student_head, producer)

    student_rows, switch_rows = _rows(embed, producer, tokens)
    reference, _ = terms(student_head(student_rows), switch_rows, slice(0, N))
    (scale * reference).backward()
    expected = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None

    student_rows, switch_rows = _rows(embed, producer, tokens)
    loss, extras = chunked_loss(terms, chunks, chunk_size, student_rows, switch_rows, student_head)
    assert [part for _, part in extras] == [
        slice(i * chunk_size, (i + 1) * chunk_size) for i in range(chunks)
    ]
    (scale * loss).backward()
    assert teacher_head.weight.grad is None
    assert all(p.grad is None for p in student_head.parameters() if not p.requires_grad)
    return (loss, {name: p.grad for name, p in params.items()}), (reference.detach(), expected)


@pytest.mark.parametrize("head_kind", ["tied", "untied", "custom"])
@pytest.mark.parametrize("chunk_size,chunks", [(N, 1), (4, 4), (5, 3), (4, 6)])
def test_chunked_gradients_equal_plain_autograd(chunk_size, chunks, head_kind):
    """Loss and every gradient (rows' producers, the head's weight, tied or not, and bias)
    equal the unchunked autograd run, for even and uneven chunks and with extra empty chunks,
    through the written-out linear head (tied, untied) and through autograd for a head of
    another kind (custom); backward's scale (0.37, as a 1/N normaliser) multiplies the kept
    gradients."""
    (loss, grads), (reference, expected) = _reference_and_chunked(
        chunk_size, head_kind, chunk_size, chunks
    )
    assert_close(loss, reference, terms=N, name="loss")
    for name, want in expected.items():
        assert_close(grads[name], want, terms=N * V, name=name)


def test_no_grad_runs_the_chunks_without_taking_gradients():
    embed, student_head, teacher_head, producer, tokens, targets = _setup(seed=1)
    terms = _terms(teacher_head, targets)
    with torch.no_grad():
        student_rows, switch_rows = _rows(embed, producer, tokens)
        loss, extras = chunked_loss(terms, 3, 5, student_rows, switch_rows, student_head)
        reference, _ = terms(student_head(student_rows), switch_rows, slice(0, N))
    assert loss.grad_fn is None and len(extras) == 3
    assert_close(loss, reference, terms=N, name="loss")


def test_rows_without_switch_pass():
    """Student rows only (no teacher term): gradients equal plain autograd."""
    embed, student_head, _, _, tokens, targets = _setup(seed=2)

    def ce_terms(student_logits, switch_rows, part):
        assert switch_rows is None
        return F.cross_entropy(student_logits, targets[part], reduction="sum"), None

    rows = torch.tanh(embed(tokens))
    ce_terms(student_head(rows), None, slice(0, N))[0].backward()
    expected = embed.weight.grad.clone()
    embed.weight.grad = None
    loss, _ = chunked_loss(ce_terms, 4, 4, torch.tanh(embed(tokens)), None, student_head)
    loss.backward()
    assert_close(embed.weight.grad, expected, terms=N * V, name="embed/head weight")


def test_a_frozen_head_passes_gradients_to_the_rows_only():
    """A frozen student head (a LoRA student's): the rows get theirs, the head none."""
    (_, grads), (_, expected) = _reference_and_chunked(3, "untied", 4, 4, frozen_head=True)
    assert sorted(grads) == ["embed", "producer bias", "producer weight"]
    for name, want in expected.items():
        assert_close(grads[name], want, terms=N * V, name=name)


class _NewTensorsOfShape(TorchDispatchMode):
    """Counts the op outputs of one shape that own new memory (not views or in-place results
    of an op's inputs)."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if (
                isinstance(t, torch.Tensor)
                and tuple(t.shape) == self.shape
                and t.untyped_storage().data_ptr() not in inputs
            ):
                self.count += 1
        return out


@pytest.mark.parametrize("chunks", [1, 4, 8])
def test_one_head_gradient_buffer_per_step_whatever_the_chunk_count(chunks):
    """The student head's `[V, H]` gradient is allocated once and accumulated in place: the
    forward and backward of `chunked_loss` create one new `[V, H]` tensor at 1, 4 and 8
    chunks (autograd per chunk created one per chunk). The rows are leaves here, so that no
    other `[V, H]` gradient (the embedding's) is counted."""
    _, student_head, teacher_head, producer, _, targets = _setup(4, "untied")
    student_rows = torch.randn(N, H_S, requires_grad=True)
    switch_rows = producer(student_rows)
    counter = _NewTensorsOfShape(tuple(student_head.weight.shape))
    with counter:
        loss, _ = chunked_loss(
            _terms(teacher_head, targets), chunks, -(-N // chunks), student_rows, switch_rows,
            student_head,
        )  # fmt: skip
        loss.backward()
    assert counter.count == 1, f"{counter.count} new [V, H] tensors at {chunks} chunks"
    assert student_head.weight.grad is not None


def test_autocast_bf16_with_float32_weights():
    """Under CPU autocast (bf16 compute, float32 weights, as the HF Trainer's --bf16 without
    DeepSpeed): the chunks get bf16 logits as the head would give them, every gradient comes
    back float32, and equals autograd's up to bf16 rounding (the weight gradient accumulates
    in float32, autograd rounds each product to bf16 first)."""
    embed, student_head, teacher_head, producer, tokens, targets = _setup(5, "untied")
    terms = _terms(teacher_head, targets)
    seen = []

    def recording_terms(student_logits, switch_rows, part):
        seen.append(student_logits.dtype)
        return terms(student_logits, switch_rows, part)

    params = _parameters(embed, student_head, producer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_rows, switch_rows = _rows(embed, producer, tokens)
        reference, _ = terms(student_head(student_rows), switch_rows, slice(0, N))
    reference.backward()
    expected = {name: p.grad.clone() for name, p in params.items()}
    for p in params.values():
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student_rows, switch_rows = _rows(embed, producer, tokens)
        loss, _ = chunked_loss(recording_terms, 4, 4, student_rows, switch_rows, student_head)
    loss.backward()
    assert seen == [torch.bfloat16] * 4
    for name, p in params.items():
        want = expected[name]
        bf16_rounding = tolerance(want.bfloat16().float(), N * V) * 2**16  # eps bf16 / eps f32
        assert_close(p.grad, want, terms=N * V, extra=bf16_rounding, name=name)
