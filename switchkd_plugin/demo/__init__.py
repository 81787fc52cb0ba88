"""The built-in demo task: synthetic shapes VQA, in TinyLLaVA Factory's data format and for HF
LLaVA."""

from switchkd_plugin.demo.hf_data import (
    ChatFormat,
    LlavaCollator,
    LlavaJsonDataset,
    chat_format_for,
    exact_match,
    load_pixel_values,
    normalise_answer,
)
from switchkd_plugin.demo.shapes import (
    ANSWERS,
    FACTORY_CONV_VERSION,
    QUESTION_TYPES,
    LlavaDatasetPaths,
    SceneObject,
    ShapesSample,
    ShapesTaskConfig,
    generate_splits,
    load_records,
    parse_record,
    render_scene,
    write_llava_dataset,
)

__all__ = [
    "ANSWERS",
    "FACTORY_CONV_VERSION",
    "QUESTION_TYPES",
    "ChatFormat",
    "LlavaCollator",
    "LlavaDatasetPaths",
    "LlavaJsonDataset",
    "SceneObject",
    "ShapesSample",
    "ShapesTaskConfig",
    "chat_format_for",
    "exact_match",
    "generate_splits",
    "load_pixel_values",
    "load_records",
    "normalise_answer",
    "parse_record",
    "render_scene",
    "write_llava_dataset",
]
