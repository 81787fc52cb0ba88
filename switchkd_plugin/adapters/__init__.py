"""Host adapters: stage-by-stage access to a VLM for the distillation engine."""

from __future__ import annotations

from torch import nn

from switchkd_plugin.adapters.base import MultimodalInputs, SpliceRules, VLMAdapter
from switchkd_plugin.adapters.gemma3 import Gemma3Adapter
from switchkd_plugin.adapters.hf_llava import HFLlavaAdapter
from switchkd_plugin.adapters.internvl import InternVLAdapter
from switchkd_plugin.adapters.llava_onevision import LlavaOnevisionAdapter
from switchkd_plugin.adapters.qwen_vl import Qwen2_5_VLAdapter, Qwen3VLAdapter
from switchkd_plugin.adapters.smolvlm import SmolVLMAdapter
from switchkd_plugin.adapters.splice import splice_image_features
from switchkd_plugin.adapters.tinyllava import TinyLlavaAdapter

ADAPTERS: tuple[type[VLMAdapter], ...] = (
    TinyLlavaAdapter,
    HFLlavaAdapter,
    Qwen2_5_VLAdapter,
    Qwen3VLAdapter,
    LlavaOnevisionAdapter,
    InternVLAdapter,
    Gemma3Adapter,
    SmolVLMAdapter,
)

__all__ = [
    "ADAPTERS",
    "Gemma3Adapter",
    "HFLlavaAdapter",
    "InternVLAdapter",
    "LlavaOnevisionAdapter",
    "MultimodalInputs",
    "Qwen2_5_VLAdapter",
    "Qwen3VLAdapter",
    "SmolVLMAdapter",
    "SpliceRules",
    "TinyLlavaAdapter",
    "VLMAdapter",
    "adapter_class_for",
    "adapter_for",
    "splice_image_features",
]


def adapter_class_for(model_class: type) -> type[VLMAdapter]:
    """The adapter class for models of ``model_class``; TypeError for an unsupported one."""
    for adapter_class in ADAPTERS:
        if adapter_class.supports_class(model_class):
            return adapter_class
    supported = ", ".join(adapter_class.host_class_name for adapter_class in ADAPTERS)
    raise TypeError(
        f"no Switch-KD adapter for {model_class.__module__}.{model_class.__qualname__}; "
        f"supported: {supported}"
    )


def adapter_for(model: nn.Module) -> VLMAdapter:
    """The adapter for ``model``'s class. A PEFT model is unwrapped to its base model (LoRA
    layers are injected in place, so the base model's stages include them).

    Raises TypeError, listing the supported classes, for any other model.
    """
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    try:
        adapter_class = adapter_class_for(type(model))
    except TypeError as error:
        if hasattr(model, "module"):
            hint = "a DDP/DeepSpeed wrapper? pass the wrapped model, e.g. `.module`"
            raise TypeError(f"{error} ({hint})") from None
        raise
    return adapter_class(model)
