"""The loop both pretrainings of the shared vision encoder run (``demo/vision_pretrain.py``: cell
labels; ``demo/masked_pretrain.py``: masked patches): AdamW over the encoder and the
pretraining's throw-away heads, 5% linear warm-up then cosine decay, no weight decay, seeded
epochs of shuffled examples."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import transformers
from torch import Tensor, nn
from tqdm.auto import tqdm


def train_encoder(
    vision: nn.Module,
    heads: list[nn.Module],
    examples: int,
    batch_loss: Callable[[Tensor], Tensor],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    generator: torch.Generator,
    description: str,
) -> None:
    """Train ``vision`` and ``heads`` (in place) for ``steps`` steps of ``batch_loss(indices)``,
    ``indices`` [batch_size] drawn from ``examples`` examples, a new shuffled epoch (from
    ``generator``) whenever fewer than a batch are left; ``vision`` ends in eval mode."""
    parameters = [*vision.parameters(), *(p for head in heads for p in head.parameters())]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    scheduler = transformers.get_cosine_schedule_with_warmup(
        optimizer, math.ceil(0.05 * steps), steps
    )
    vision.train()
    order = torch.empty(0, dtype=torch.long)
    bar = tqdm(range(steps), desc=description, dynamic_ncols=True)
    for step in bar:
        if len(order) < batch_size:  # a new epoch, shuffled with the seeded generator
            order = torch.cat([order, torch.randperm(examples, generator=generator)])
        batch, order = order[:batch_size], order[batch_size:]
        loss = batch_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3g}")
    bar.close()
    vision.eval()
