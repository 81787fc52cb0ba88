"""The loss stage's gradient-in-forward chunk loop against plain autograd on the same sum."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from switchkd_plugin.objective.loss_stage import chunked_loss
from switchkd_plugin.testing.tensor_close import assert_close

N, H_S, H_T, V = 13, 8, 12, 40


def _setup(seed: int):
    """Student rows and switch rows from small differentiable producers, a student head whose
    weight is tied to an embedding used elsewhere in the graph, a frozen teacher head."""
    torch.manual_seed(seed)
    embed = nn.Embedding(V, H_S)
    student_head = nn.Linear(H_S, V, bias=True)
    student_head.weight = embed.weight  # tied, as in Qwen2.5-0.5B
    teacher_head = nn.Linear(H_T, V, bias=False).requires_grad_(False)
    producer = nn.Linear(H_S, H_T)
    tokens = torch.randint(0, V, (N,))
    targets = torch.randint(0, V, (N,))
    return embed, student_head, teacher_head, producer, tokens, targets


def _rows(embed, producer, tokens):
    student_rows = torch.tanh(embed(tokens))  # [N, H_S]
    return student_rows, producer(student_rows)  # [N, H_T]


def _terms(student_head, teacher_head, targets):
    def chunk_terms(student_rows, switch_rows, part):
        student_logits = student_head(student_rows)
        switch_logits = teacher_head(switch_rows)
        ce = F.cross_entropy(student_logits, targets[part], reduction="sum")
        pull = (switch_logits.log_softmax(-1) * student_logits.detach().softmax(-1)).sum()
        loss = ce - 0.5 * pull
        return loss, (ce.detach(), part)

    return chunk_terms


@pytest.mark.parametrize("chunk_size,chunks", [(N, 1), (4, 4), (5, 3), (4, 6)])
def test_chunked_gradients_equal_plain_autograd(chunk_size, chunks):
    """Loss and every gradient (rows' producers, tied head weight, bias) equal the unchunked
    autograd run, for even and uneven chunks and with extra empty chunks; backward's scale
    (here 0.37, as a 1/N normaliser) multiplies the kept gradients."""
    embed, student_head, teacher_head, producer, tokens, targets = _setup(seed=chunk_size)
    terms = _terms(student_head, teacher_head, targets)
    params = [embed.weight, student_head.bias, *producer.parameters()]

    student_rows, switch_rows = _rows(embed, producer, tokens)
    reference, _ = terms(student_rows, switch_rows, slice(0, N))
    (0.37 * reference).backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    student_rows, switch_rows = _rows(embed, producer, tokens)
    head_params = list(student_head.parameters()) + list(teacher_head.parameters())
    loss, extras = chunked_loss(terms, chunks, chunk_size, student_rows, switch_rows, head_params)
    assert [part for _, part in extras] == [
        slice(i * chunk_size, (i + 1) * chunk_size) for i in range(chunks)
    ]
    (0.37 * loss).backward()
    assert_close(loss, reference.detach(), terms=N, name="loss")
    names = ["embed/head weight", "head bias", "producer weight", "producer bias"]
    for name, p, want in zip(names, params, expected, strict=True):
        assert_close(p.grad, want, terms=N * V, name=name)
    assert teacher_head.weight.grad is None


def test_no_grad_runs_the_chunks_without_taking_gradients():
    embed, student_head, teacher_head, producer, tokens, targets = _setup(seed=1)
    terms = _terms(student_head, teacher_head, targets)
    with torch.no_grad():
        student_rows, switch_rows = _rows(embed, producer, tokens)
        loss, extras = chunked_loss(terms, 3, 5, student_rows, switch_rows, [])
        reference, _ = terms(student_rows, switch_rows, slice(0, N))
    assert loss.grad_fn is None and len(extras) == 3
    assert_close(loss, reference, terms=N, name="loss")


def test_rows_without_switch_pass():
    """Student rows only (no teacher term): gradients equal plain autograd."""
    embed, student_head, _, _, tokens, targets = _setup(seed=2)

    def ce_terms(student_rows, switch_rows, part):
        assert switch_rows is None
        ce = F.cross_entropy(student_head(student_rows), targets[part], reduction="sum")
        return ce, None

    rows = torch.tanh(embed(tokens))
    ce_terms(rows, None, slice(0, N))[0].backward()
    expected = embed.weight.grad.clone()
    embed.weight.grad = None
    loss, _ = chunked_loss(ce_terms, 4, 4, torch.tanh(embed(tokens)), None, [embed.weight])
    loss.backward()
    assert_close(embed.weight.grad, expected, terms=N * V, name="embed/head weight")
