"""The demo's own initial weights: a function of the seed only (the same on every transformers
release and on both hosts), with the documented distribution per component."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from switchkd_plugin.demo.hosts import HFLlavaHost, TinyLlavaHost
from switchkd_plugin.demo.models import LANGUAGE_INIT_STD, _canonical_order, build_model, components
from switchkd_plugin.integrations.tinyllava.compat import factory_import_error
from switchkd_plugin.testing.tiny_models import build_tokenizer, teacher_spec

SPEC = teacher_spec(vision_feature_layer=-1)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _components(model) -> dict[str, list[tuple[str, torch.Tensor]]]:
    return {name: _canonical_order(module) for name, module in components(model).items()}


def _same(a, b) -> bool:
    ours, theirs = _components(a), _components(b)
    return all(
        torch.equal(p, q)
        for name in ours
        for (_, p), (_, q) in zip(ours[name], theirs[name], strict=True)
    )


def test_weights_follow_the_seed_only(tokenizer) -> None:
    first, again = (build_model(HFLlavaHost(), SPEC, tokenizer) for _ in range(2))
    assert _same(first, again)
    other = build_model(HFLlavaHost(), dataclasses.replace(SPEC, seed=9), tokenizer)
    assert not _same(first, other)


def test_each_component_has_its_documented_distribution(tokenizer) -> None:
    model = build_model(HFLlavaHost(), SPEC, tokenizer)
    for component, named in _components(model).items():
        for name, parameter in named:
            if name.endswith("bias"):
                assert torch.count_nonzero(parameter) == 0, name
            elif parameter.dim() == 1:
                assert torch.all(parameter == 1), name
            elif parameter.numel() >= 1000:
                fan_in = parameter[0].numel()
                std = 1 / math.sqrt(fan_in) if component == "vision" else LANGUAGE_INIT_STD
                # The sample std of n normal draws is within 5 / sqrt(2 n) of std (relative).
                tolerance = 5 / math.sqrt(2 * parameter.numel())
                assert parameter.std().item() == pytest.approx(std, rel=tolerance), name
                assert abs(parameter.mean().item()) < 5 * std / math.sqrt(parameter.numel())


@pytest.mark.skipif(factory_import_error() is not None, reason="needs TinyLLaVA Factory")
def test_both_hosts_start_from_the_same_weights(tokenizer) -> None:
    hf = build_model(HFLlavaHost(), SPEC, tokenizer)
    factory = build_model(TinyLlavaHost(), SPEC, tokenizer)
    for name in ("vision", "connector", "decoder", "lm_head"):
        pairs = zip(_components(hf)[name], _components(factory)[name], strict=True)
        for (hf_name, p), (_, q) in pairs:
            assert torch.equal(p, q), (name, hf_name)
