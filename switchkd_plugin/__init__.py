"""Switch-KD: visual-switch knowledge distillation for vision-language models.

The reference implementation for TinyLLaVA Factory and Hugging Face transformers LLaVA models.
"""

from .config import SwitchKDArguments
from .training.trainer import SwitchKDTrainer, SwitchKDTrainerMixin, switchkd_trainer_class
from .training.training_config import SwitchKDConfig

__version__ = "0.1.0"

__all__ = [
    "SwitchKDArguments",
    "SwitchKDConfig",
    "SwitchKDTrainer",
    "SwitchKDTrainerMixin",
    "switchkd_trainer_class",
]
