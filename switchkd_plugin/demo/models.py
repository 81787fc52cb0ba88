"""The demo's models: built through the host from a spec, then initialised by the demo itself.

Why the demo draws its own initial weights: transformers' releases initialise the same tiny
LLaVA from the same seed with different numbers. The distributions barely differ (5.x draws
SigLIP's patch embedding with std 0.082 where 4.40 uses LeCun's 0.072), but the modules are
visited in another order, so every tensor gets other random values. With the same initial
weights both releases train the teacher step for step alike (measured: the first 40 losses agree
to 1e-6, eval logits to 3e-7), yet from their own inits the demo's teacher reached 86% on 4.40.1
and 66% on 5.24.0. ``initialise`` makes the initial weights a function of the seed alone: the
same on every release and on both hosts.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import nn

from switchkd_plugin.adapters import adapter_for
from switchkd_plugin.demo.hosts import DemoHost
from switchkd_plugin.testing.tiny_models import TinyVLMSpec

# Qwen2's and LLaVA's initializer_range: the std of the language side's weights.
LANGUAGE_INIT_STD = 0.02
# Wrapper modules whose names differ by release or host (HF SigLIP's ``vision_model``, the
# Factory's ``_vision_tower`` and ``_connector``); without them, names agree.
_WRAPPERS = ("vision_model", "_vision_tower", "_connector")


def _canonical_order(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``module``'s named parameters sorted by their names without wrapper segments: releases
    register submodules in different orders (5.x's SigLIP layer puts ``layer_norm1`` first), and
    the hosts name the connector's linears differently, but sort them alike."""

    def canonical(item: tuple[str, nn.Parameter]) -> str:
        return ".".join(part for part in item[0].split(".") if part not in _WRAPPERS)

    return sorted(module.named_parameters(), key=canonical)


def _generator(seed: int, component: str, index: int) -> torch.Generator:
    """A generator of its own per parameter, so a parameter's values depend on its place only."""
    digest = hashlib.sha256(f"switchkd-demo-init/{seed}/{component}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def components(model: nn.Module) -> dict[str, nn.Module]:
    """The model's parts that draw their own initial weights, by name."""
    adapter = adapter_for(model)
    return {
        "vision": adapter.vision_module,
        "connector": adapter.connector,
        "decoder": adapter.decoder,
        "lm_head": adapter.lm_head,
    }


@torch.no_grad()
def initialise(model: nn.Module, seed: int) -> None:
    """Redraw every parameter of ``model`` (in place) from ``seed``, independently of the
    transformers release and the host.

    Rules: biases 0; other 1-D weights (norm scales) 1; matrices, convolutions and embeddings of
    the vision encoder N(0, 1/fan_in) (LeCun normal, SigLIP's scheme); those of the connector,
    the language model and the lm_head N(0, 0.02^2).
    """
    for component, module in components(model).items():
        for index, (name, parameter) in enumerate(_canonical_order(module)):
            if name.endswith("bias"):
                parameter.zero_()
            elif parameter.dim() == 1:
                parameter.fill_(1.0)
            else:
                fan_in = parameter[0].numel()
                std = 1 / math.sqrt(fan_in) if component == "vision" else LANGUAGE_INIT_STD
                values = torch.randn(parameter.shape, generator=_generator(seed, component, index))
                parameter.copy_(values * std)


def build_model(host: DemoHost, spec: TinyVLMSpec, tokenizer: Any) -> nn.Module:
    """The host's fp32 model of ``spec``, its weights drawn by ``initialise`` from ``spec.seed``."""
    model = host.build(spec, tokenizer)
    initialise(model, spec.seed)
    return model
