"""Switch-KD: visual-switch knowledge distillation for vision-language models.

The reference implementation for TinyLLaVA Factory and Hugging Face transformers LLaVA models.
"""

__version__ = "0.1.0"
