"""The Factory strategy's argv checks, which run before the Factory is imported (no Factory
needed)."""

from __future__ import annotations

import pytest
import torch

from switchkd_plugin.integrations.tinyllava.train import check_quantized_recipe


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("flags", [["--training_recipe", "qlora_int8"],
                                   ["--training_recipe=QLoRA_int4", "--bf16", "True"]])  # fmt: skip
def test_qlora_recipes_are_refused_without_a_gpu(flags):
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU.*use --training_recipe lora"):
        check_quantized_recipe(flags)


LATER_FLAG_WINS = ["--training_recipe", "qlora_int8", "--training_recipe", "common"]


@pytest.mark.parametrize("flags", [[], ["--training_recipe", "lora"], LATER_FLAG_WINS])
def test_other_recipes_pass_the_quantization_check(flags):
    check_quantized_recipe(flags)
