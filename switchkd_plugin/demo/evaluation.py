"""The demo's evaluation: greedy short answers, scored by exact match per question type."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from switchkd_plugin.demo.hf_data import exact_match
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.testing.tiny_models import EOS_TOKEN

OVERALL = "overall"

Accuracy = dict[str, float]  # question type (and OVERALL) -> exact-match accuracy


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: dict[str, torch.Tensor], eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuation ids of a left-padded prompt batch, up to ``max_new_tokens`` each,
    cut after the first ``eos_id``. Re-runs the full forward per token (no KV cache: prompts are
    short, and this behaves the same on every transformers release)."""
    ids, mask = prompts["input_ids"], prompts["attention_mask"]
    images = {
        key: value for key, value in prompts.items() if key not in ("input_ids", "attention_mask")
    }
    new = []
    for _ in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=mask, **images).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        new.append(token)
        # Finished rows keep generating, ignored below. Rows are never right-padded: the last
        # position must be each row's own (transformers 4.40's LLaVA infers the padding side
        # from the last column; the TinyLLaVA host's models re-pad on the left after splicing).
        ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
        if all(eos_id in row for row in torch.cat(new, 1).tolist()):
            break
    rows = torch.cat(new, 1).tolist()
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


def evaluate(
    host: DemoHost,
    model: nn.Module,
    dataset: Any,
    question_types: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    description: str = "evaluate",
) -> Accuracy:
    """Exact-match accuracy of greedy short answers, per question type and overall."""
    model.eval()
    tokenizer = dataset.tokenizer
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    correct: dict[str, list[bool]] = {kind: [] for kind in question_types}
    starts = range(0, len(dataset), batch_size)
    for start in tqdm(starts, desc=description, dynamic_ncols=True, leave=False):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        answers = greedy_decode(model, host.prompts(dataset, indices), eos_id, max_new_tokens)
        for i, answer_ids in zip(indices, answers, strict=True):
            prediction = tokenizer.decode(answer_ids, skip_special_tokens=True)
            correct[dataset.question_type(i)].append(exact_match(prediction, dataset.answer(i)))
    accuracy = {kind: sum(hits) / max(len(hits), 1) for kind, hits in correct.items()}
    accuracy[OVERALL] = sum(map(sum, correct.values())) / max(len(dataset), 1)
    return accuracy
