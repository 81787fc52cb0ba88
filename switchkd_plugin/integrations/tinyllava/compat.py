"""Make TinyLLaVA Factory run on Python >= 3.11 and transformers 4.40.1 to 5.x, without editing it.

``install()`` puts an import hook in front of the few Factory modules that break; the hook runs a
fix right before or right after such a module executes. Each fix checks that its breakage is
present and is a no-op otherwise:

- Python >= 3.11 (``tinyllava.data.template.formatter``, after): the chat templates are
  dataclasses whose fields default to formatter *instances*; ``dataclasses`` rejects a default
  whose class is unhashable, and the formatters are ``eq=True`` dataclasses. They get an identity
  hash, the Python 3.10 behaviour (one shared, never-mutated formatter per template class).
- transformers >= 4.56 moved ``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices``
  and ``prune_linear_layer`` out of ``transformers.modeling_utils`` (5.x dropped the second);
  the Factory's qformer connector imports them from there (before it executes: re-exported).
- transformers >= 4.53 no longer exports ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``;
  ``tinyllava.train.tinyllava_trainer`` imports it from there (before: re-exported).
- transformers >= 4.54 reads ``_supports_sdpa`` inside ``PreTrainedModel.__init__``, before the
  Factory's model has its ``language_model`` (after ``modeling_tinyllava``: the property then
  answers for the LLM class about to be built).
- transformers 5.x calls ``model.tie_weights(missing_keys=..., recompute_mapping=...)``; the
  Factory's override takes no arguments (after: accepted, and the LLM ties its own weights).
- transformers >= 4.52 calls ``self._get_train_sampler(train_dataset)``; ``LLaVATrainer``'s
  override takes no argument (after: accepted; the Factory's sampler reads ``self.train_dataset``,
  which has the same length).
- transformers 5.x rejects ``Trainer(tokenizer=...)``, which the Factory's ``train()`` passes
  (after: ``LLaVATrainer`` forwards it as ``processing_class``).
- The LoRA recipe (``tinyllava.training_recipe.lora_recipe``, after) asks ``model.peft_config is
  None`` to decide whether to add adapters; no transformers release the Factory runs on gives a
  model without adapters that attribute, so the recipe raises ``AttributeError`` before training.
  A model without the attribute is treated as having no adapters (what the check means).
- The LoRA recipe's ``save`` writes the language model's base weights from ``named_parameters()``,
  which names a tied weight once: for an LLM that ties its embeddings (Qwen2-0.5B, Qwen2.5-0.5B)
  ``lm_head.weight`` is left out, and the Factory's ``load_pretrained_model`` (a strict
  ``load_state_dict``) refuses the checkpoint. After the recipe saves, the tied names are added
  to ``language_model/pytorch_model.bin``, sharing the saved tensor, so the Factory's own loader,
  in any process, finds every key (loading one tensor twice into one parameter keeps the tie).
- ``--group_by_modality_length True`` on data of one modality (no text-only sample, or no image)
  crashes the Factory's sampler (``not enough values to unpack``): it splits the indices by
  modality and unpacks each part. With one modality there is nothing to separate, so the
  indices are grouped by length alone (the Factory's length-grouped sampler), and a log line says
  so.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import inspect
import logging
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_FORMATTER_MODULE = "tinyllava.data.template.formatter"
_QFORMER_MODULE = "tinyllava.model.connector.qformer"
_MODELING_MODULE = "tinyllava.model.modeling_tinyllava"
_LORA_RECIPE_MODULE = "tinyllava.training_recipe.lora_recipe"
_TRAINER_MODULE = "tinyllava.train.tinyllava_trainer"
# What the Factory's own training and data code needs; importing them proves the fixes worked.
_FACTORY_MODULES = ("tinyllava.model", "tinyllava.data", "tinyllava.utils")
# transformers.modeling_utils names the Factory imports that moved to transformers.pytorch_utils.
_MOVED_TO_PYTORCH_UTILS = (
    "apply_chunking_to_forward",
    "find_pruneable_heads_and_indices",
    "prune_linear_layer",
)

logger = logging.getLogger(__name__)


def _accepts_keyword(func: Callable[..., Any], name: str) -> bool:
    """Whether ``func`` takes a keyword argument ``name``; decorators' own signatures count, as a
    deprecation shim taking ``**kwargs`` accepts a renamed keyword that the inner one lacks."""
    parameters = inspect.signature(func, follow_wrapped=False).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


# ------------------------------------------------------------------ before a module executes


def _export_moved_helpers() -> None:
    """Re-export from ``transformers.modeling_utils`` what moved to ``pytorch_utils``."""
    from transformers import modeling_utils, pytorch_utils

    for name in _MOVED_TO_PYTORCH_UTILS:
        if not hasattr(modeling_utils, name):
            helper = getattr(pytorch_utils, name, None) or _removed_helper(name)
            setattr(modeling_utils, name, helper)


def _removed_helper(name: str) -> Callable[..., Any]:
    """Stands in for a helper transformers removed; only head pruning would call it."""

    def removed(*args: object, **kwargs: object) -> Any:
        raise NotImplementedError(
            f"transformers {_transformers_version()} removed {name}; TinyLLaVA Factory's "
            "qformer connector cannot prune attention heads on it"
        )

    removed.__name__ = name
    return removed


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _export_layernorm_layers() -> None:
    """Re-export ``ALL_LAYERNORM_LAYERS`` from ``transformers.trainer``."""
    from transformers import pytorch_utils, trainer

    if not hasattr(trainer, "ALL_LAYERNORM_LAYERS"):
        trainer.ALL_LAYERNORM_LAYERS = pytorch_utils.ALL_LAYERNORM_LAYERS


# ------------------------------------------------------------------- after a module executes


def _make_dataclasses_hashable(module: types.ModuleType) -> None:
    """Give every unhashable dataclass defined in ``module`` an identity ``__hash__``."""
    if sys.version_info < (3, 11):
        return
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and dataclasses.is_dataclass(value)
            and value.__hash__ is None
        ):
            value.__hash__ = object.__hash__


def _fix_model(module: types.ModuleType) -> None:
    """``_supports_sdpa`` before the LLM exists; ``tie_weights`` with transformers 5's keywords."""
    from transformers import PreTrainedModel

    base, model = module.TinyLlavaPreTrainedModel, module.TinyLlavaForConditionalGeneration
    llm_factory = module.LLMFactory
    original_supports_sdpa = vars(base).get("_supports_sdpa")
    if (
        hasattr(PreTrainedModel, "_check_and_adjust_attn_implementation")  # asks in __init__
        and getattr(original_supports_sdpa, "fget", None) is not None
        and not getattr(original_supports_sdpa.fget, "_switchkd_compat", False)
    ):
        language_model_supports_sdpa = original_supports_sdpa.fget

        def _supports_sdpa(self: Any) -> bool:
            if "language_model" not in self._modules:
                return llm_factory(self.config.llm_model_name_or_path)[0]._supports_sdpa
            return language_model_supports_sdpa(self)

        _supports_sdpa._switchkd_compat = True
        base._supports_sdpa = property(_supports_sdpa)

    if _accepts_keyword(PreTrainedModel.tie_weights, "recompute_mapping") and not (
        _accepts_keyword(model.tie_weights, "recompute_mapping")
    ):
        original_tie_weights = model.tie_weights

        def tie_weights(self: Any, *args: object, **kwargs: object) -> Any:
            # The keywords describe this wrapper's own tied keys (it has none); the LLM recomputes
            # its own mapping when called without them.
            return original_tie_weights(self)

        model.tie_weights = tie_weights


def _fix_trainer(module: types.ModuleType) -> None:
    """``_get_train_sampler(train_dataset)`` and ``tokenizer=`` for ``LLaVATrainer``; its
    modality-grouped sampler on data of one modality."""
    from transformers import Trainer

    trainer = module.LLaVATrainer
    base_takes_dataset = len(inspect.signature(Trainer._get_train_sampler).parameters) > 1
    if base_takes_dataset and len(inspect.signature(trainer._get_train_sampler).parameters) == 1:
        original_sampler = trainer._get_train_sampler

        def _get_train_sampler(self: Any, train_dataset: object = None) -> Any:
            return original_sampler(self)

        trainer._get_train_sampler = _get_train_sampler

    if not _accepts_keyword(trainer.__init__, "tokenizer"):
        original_init = trainer.__init__

        def __init__(self: Any, *args: object, tokenizer: object = None, **kwargs: object) -> None:
            if tokenizer is not None:
                if "processing_class" in kwargs:
                    raise TypeError("pass either tokenizer or processing_class, not both")
                kwargs["processing_class"] = tokenizer
            original_init(self, *args, **kwargs)

        trainer.__init__ = __init__

    _group_one_modality_by_length(module)


def _group_one_modality_by_length(module: types.ModuleType) -> None:
    """The modality-grouped sampler on data of one modality: grouped by length alone."""
    original = module.get_modality_length_grouped_indices
    if getattr(original, "_switchkd_compat", False):
        return
    by_length = module.get_length_grouped_indices

    def get_modality_length_grouped_indices(
        lengths: Sequence[int], batch_size: int, world_size: int, generator: Any = None
    ) -> list[int]:
        # The Factory's lengths: > 0 for a sample with an image, < 0 for a text-only one.
        for sign, kind, absent in ((1, "with an image", "text-only"), (-1, "text-only", "image")):
            if all(length * sign > 0 for length in lengths):
                logger.warning(
                    "every training sample is %s (no %s sample): --group_by_modality_length "
                    "groups the batches by length alone",
                    kind,
                    absent,
                )
                return by_length(
                    [abs(length) for length in lengths], batch_size, world_size, generator=generator
                )
        return original(lengths, batch_size, world_size, generator=generator)

    get_modality_length_grouped_indices._switchkd_compat = True
    module.get_modality_length_grouped_indices = get_modality_length_grouped_indices


def _fix_lora_recipe(module: types.ModuleType) -> None:
    """The LoRA recipe's adapter check and its save of a tied language model."""
    _fix_lora_adapter_check(module)
    _fix_lora_save(module)


def _fix_lora_adapter_check(module: types.ModuleType) -> None:
    """``LoRATrainingRecipe.training_model_converse`` on a model without ``peft_config``.

    The recipe reads ``model.peft_config`` and then calls ``get_peft_model(model, ...)``; peft
    must not find the attribute (it would extend it as a dict). So the model carries
    ``peft_config = None`` only for the recipe's check, and loses it before peft sees it.
    """
    recipe = module.LoRATrainingRecipe
    original = recipe.training_model_converse
    if getattr(original, "_switchkd_compat", False):
        return
    get_peft_model = module.get_peft_model

    def _drop_placeholder(model: Any) -> None:
        if "peft_config" in vars(model) and model.peft_config is None:
            del model.peft_config

    def get_peft_model_without_placeholder(model: Any, *args: object, **kwargs: object) -> Any:
        _drop_placeholder(model)
        return get_peft_model(model, *args, **kwargs)

    def training_model_converse(self: Any, model: Any) -> Any:
        if hasattr(model, "peft_config"):  # the recipe's own check works: nothing to fix
            return original(self, model)
        model.peft_config = None  # "no adapters yet": the recipe adds them
        try:
            return original(self, model)
        finally:
            _drop_placeholder(model)

    training_model_converse._switchkd_compat = True
    module.get_peft_model = get_peft_model_without_placeholder
    recipe.training_model_converse = training_model_converse


def _fix_lora_save(module: types.ModuleType) -> None:
    """``LoRATrainingRecipe.save`` writes every name of a tied language-model weight."""
    recipe = module.LoRATrainingRecipe
    original = recipe.save
    if getattr(original, "_switchkd_compat", False):
        return

    def save(self: Any, model: Any, trainer: Any) -> None:
        original(self, model, trainer)
        if trainer.args.local_rank in (0, -1):  # the ranks the recipe writes on
            path = Path(self.training_arguments.output_dir, "language_model", "pytorch_model.bin")
            _add_tied_names(path, model.language_model)

    save._switchkd_compat = True
    recipe.save = save


def _add_tied_names(path: Path, module: Any) -> None:
    """Add to the state dict saved at ``path`` the names under which ``module`` holds a
    parameter it also holds under a saved name (``named_parameters()`` gives the first only)."""
    import torch

    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        earlier = first.setdefault(id(parameter), name)
        if earlier != name:
            tied[name] = earlier
    if not tied:
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    added = {
        name: state[earlier]
        for name, earlier in tied.items()
        if name not in state and earlier in state
    }
    if added:
        state.update(added)  # the same tensors: torch.save writes their storage once
        torch.save(state, path)


_BEFORE: dict[str, Callable[[], None]] = {
    _QFORMER_MODULE: _export_moved_helpers,
    _TRAINER_MODULE: _export_layernorm_layers,
}
_AFTER: dict[str, Callable[[types.ModuleType], None]] = {
    _FORMATTER_MODULE: _make_dataclasses_hashable,
    _MODELING_MODULE: _fix_model,
    _TRAINER_MODULE: _fix_trainer,
    _LORA_RECIPE_MODULE: _fix_lora_recipe,
}


# ----------------------------------------------------------------------------- import hook


class _FixingLoader(importlib.abc.Loader):
    """Wraps the real loader of one Factory module and runs its fixes around its execution."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        before, after = _BEFORE.get(module.__name__), _AFTER.get(module.__name__)
        if before is not None:
            before()
        self._inner.exec_module(module)
        if after is not None:
            after(module)


class _FixingFinder(importlib.abc.MetaPathFinder):
    """Finds only the Factory modules that need a fix, through the normal path finder."""

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _BEFORE and fullname not in _AFTER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _FixingLoader(spec.loader)
        return spec


def install() -> None:
    """Install the fixes (idempotent). Call before importing ``tinyllava``; Factory modules that
    are already loaded get their after-import fixes at once."""
    for name, fix in _AFTER.items():
        already_loaded = sys.modules.get(name)
        if already_loaded is not None:
            fix(already_loaded)
    if not any(isinstance(finder, _FixingFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _FixingFinder())


def import_tinyllava() -> types.ModuleType:
    """Install the fixes, import the Factory's model, data and utils packages, return ``tinyllava``.

    Raises whatever the Factory's import raises (``ModuleNotFoundError`` when it is not on the
    path; other errors under a Python or transformers release these fixes do not cover).
    """
    install()
    for name in _FACTORY_MODULES:
        importlib.import_module(name)
    return sys.modules["tinyllava"]


def factory_import_error() -> Exception | None:
    """Why ``import_tinyllava()`` fails here, or ``None`` when the Factory imports."""
    try:
        import_tinyllava()
    except Exception as error:  # not on the path, a missing dependency, an unsupported release
        return error
    return None
