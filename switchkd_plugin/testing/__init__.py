"""Tiny offline models, tokenizer and batches for tests, benchmarks and demos."""

from switchkd_plugin.testing.tiny_models import (
    FACTORY_IMAGE_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    Host,
    TinyVLMSpec,
    build_hf_llava,
    build_llava_processor,
    build_tinyllava,
    build_tokenizer,
    hf_image_token_conventions,
    make_batch,
    make_conversations,
    make_host_batch,
    student_spec,
    teacher_spec,
    write_tinyllava_components,
)

__all__ = [
    "FACTORY_IMAGE_TOKEN_INDEX",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "Host",
    "TinyVLMSpec",
    "build_hf_llava",
    "build_llava_processor",
    "build_tinyllava",
    "build_tokenizer",
    "hf_image_token_conventions",
    "make_batch",
    "make_conversations",
    "make_host_batch",
    "student_spec",
    "teacher_spec",
    "write_tinyllava_components",
]
