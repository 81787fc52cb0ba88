"""factory_compat: TinyLLaVA Factory on Python >= 3.11 with transformers 4.40.1 up to 5.x.

The Factory tests skip, with the reason, where it is not importable (see ``conftest.py``). Run this
file under each transformers release of interest: each fix must be applied exactly from the
release that broke the Factory and be a no-op before it.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version
from transformers import modeling_utils, pytorch_utils
from transformers import trainer as transformers_trainer

from switchkd_plugin.integrations.tinyllava import compat as factory_compat
from switchkd_plugin.testing import make_batch

TRANSFORMERS = Version(transformers.__version__)


def _is_ours(func: object) -> bool:
    return getattr(func, "__module__", None) == factory_compat.__name__


def _remove(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType, name: str) -> None:
    """Delete ``module.name`` for one test; afterwards it is as before (present or absent)."""
    monkeypatch.setattr(module, name, None, raising=False)
    monkeypatch.delattr(module, name)


# ------------------------------------------------------------------ fixes without the Factory


def _module_with_dataclasses() -> tuple[types.ModuleType, type, type]:
    module = types.ModuleType("fake_formatter")

    @dataclasses.dataclass
    class Unhashable:
        slot: str = ""

    @dataclasses.dataclass(frozen=True)
    class Hashable:
        slot: str = ""

    for cls in (Unhashable, Hashable):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    return module, Unhashable, Hashable


def test_formatter_defaults_become_legal_and_nothing_else() -> None:
    module, unhashable, hashable = _module_with_dataclasses()
    hashable_hash = hashable.__hash__
    factory_compat._make_dataclasses_hashable(module)
    assert hashable.__hash__ is hashable_hash  # already hashable: untouched

    @dataclasses.dataclass
    class Template:  # what the Factory's templates do; raises on 3.11 without the fix
        formatter: object = unhashable(slot="x")

    assert Template().formatter == unhashable(slot="x")


def test_install_is_idempotent() -> None:
    factory_compat.install()
    factory_compat.install()
    finders = [f for f in sys.meta_path if isinstance(f, factory_compat._FixingFinder)]
    assert len(finders) == 1


@pytest.mark.parametrize("name", factory_compat._MOVED_TO_PYTORCH_UTILS)
def test_moved_helpers_are_re_exported_from_modeling_utils(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    _remove(monkeypatch, modeling_utils, name)
    factory_compat._export_moved_helpers()
    helper = getattr(modeling_utils, name)
    if hasattr(pytorch_utils, name):
        assert helper is getattr(pytorch_utils, name)
    else:  # find_pruneable_heads_and_indices, gone in 5.x: only pruning would call it
        with pytest.raises(NotImplementedError, match=name):
            helper([0], 2, 4, set())


def test_layernorm_layers_are_re_exported_from_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    _remove(monkeypatch, transformers_trainer, "ALL_LAYERNORM_LAYERS")
    factory_compat._export_layernorm_layers()
    assert transformers_trainer.ALL_LAYERNORM_LAYERS is pytorch_utils.ALL_LAYERNORM_LAYERS


def test_re_exports_keep_what_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinels = {name: object() for name in factory_compat._MOVED_TO_PYTORCH_UTILS}
    for name, sentinel in sentinels.items():
        monkeypatch.setattr(modeling_utils, name, sentinel, raising=False)
    layernorm = object()
    monkeypatch.setattr(transformers_trainer, "ALL_LAYERNORM_LAYERS", layernorm, raising=False)
    factory_compat._export_moved_helpers()
    factory_compat._export_layernorm_layers()
    assert all(getattr(modeling_utils, name) is s for name, s in sentinels.items())
    assert transformers_trainer.ALL_LAYERNORM_LAYERS is layernorm


# --------------------------------------------------------------------- fixes on the Factory


def _applied(fix: str) -> bool:
    """Whether ``fix`` replaced the Factory's own code in this process."""
    from tinyllava.model.modeling_tinyllava import (
        TinyLlavaForConditionalGeneration,
        TinyLlavaPreTrainedModel,
    )
    from tinyllava.train.tinyllava_trainer import LLaVATrainer

    if fix == "supports_sdpa":
        return getattr(
            vars(TinyLlavaPreTrainedModel)["_supports_sdpa"].fget, "_switchkd_compat", False
        )
    if fix == "tie_weights":
        return _is_ours(TinyLlavaForConditionalGeneration.tie_weights)
    if fix == "train_sampler":
        return _is_ours(LLaVATrainer._get_train_sampler)
    assert fix == "tokenizer"
    return _is_ours(vars(LLaVATrainer).get("__init__"))


@pytest.mark.parametrize(
    ("fix", "broken_since"),
    [
        ("train_sampler", "4.52"),
        ("supports_sdpa", "4.54"),
        ("tie_weights", "5.0"),
        ("tokenizer", "5.0"),
    ],
)
def test_fix_applied_exactly_from_the_breaking_release(
    tinyllava_factory: types.ModuleType, fix: str, broken_since: str
) -> None:
    import tinyllava.train.tinyllava_trainer  # noqa: F401  (not among import_tinyllava's)

    assert _applied(fix) == (TRANSFORMERS.release >= Version(broken_since).release)


def test_after_import_fixes_do_not_stack(tinyllava_factory: types.ModuleType) -> None:
    import tinyllava.model.modeling_tinyllava as modeling
    import tinyllava.train.tinyllava_trainer as trainer_module

    classes = (
        modeling.TinyLlavaPreTrainedModel,
        modeling.TinyLlavaForConditionalGeneration,
        trainer_module.LLaVATrainer,
    )
    before = [dict(vars(cls)) for cls in classes]
    factory_compat.install()  # re-applies the after-import fixes to loaded modules
    assert [dict(vars(cls)) for cls in classes] == before


def test_supports_sdpa_answers_for_the_language_model(tinyllava_student: torch.nn.Module) -> None:
    assert tinyllava_student._supports_sdpa == tinyllava_student.language_model._supports_sdpa


def test_tie_weights_takes_what_transformers_passes(tinyllava_student: torch.nn.Module) -> None:
    head = tinyllava_student.language_model.get_output_embeddings().weight
    tinyllava_student.tie_weights()
    if TRANSFORMERS.major >= 5:
        tinyllava_student.tie_weights(missing_keys=set(), recompute_mapping=False)
    # The tiny LLMs have untied embeddings: tying must leave the head alone.
    assert tinyllava_student.language_model.get_output_embeddings().weight is head


class _FactoryStyleDataset(torch.utils.data.Dataset):
    """Items as the Factory's ``LazySupervisedDataset`` makes them, with its length hints."""

    def __init__(self, batch: dict[str, torch.Tensor], modalities: str) -> None:
        keep = batch["attention_mask"].bool()
        self.items = [
            {"input_ids": ids[row], "labels": labels[row], "image": image}
            for ids, labels, image, row in zip(
                batch["input_ids"], batch["labels"], batch["images"], keep, strict=True
            )
        ]
        # > 0: with image, < 0: text only (every item has an image; only the hints differ)
        sign = {"both": lambda i: (-1) ** i, "images": lambda i: 1, "text": lambda i: -1}
        self.modality_lengths = [
            len(item["input_ids"]) * sign[modalities](i) for i, item in enumerate(self.items)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]


@pytest.mark.parametrize("modalities", ["both", "images", "text"])
def test_factory_model_and_trainer_train(
    tinyllava_student: torch.nn.Module,
    tiny_tokenizer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    modalities: str,
) -> None:
    """The target: build, forward + backward, then two steps of the Factory's ``LLaVATrainer``,
    constructed as its ``train()`` constructs it (``tokenizer=``), with its modality- and
    length-grouped sampler. Data of one modality crashed that sampler (``not enough values to
    unpack``): it now groups by length alone, and says so."""
    from tinyllava.data.dataset import DataCollatorForSupervisedDataset
    from tinyllava.train.tinyllava_trainer import LengthGroupedSampler, LLaVATrainer
    from tinyllava.utils.arguments import TrainingArguments

    model = copy.deepcopy(tinyllava_student)
    batch = make_batch(tiny_tokenizer, "tinyllava", n=4)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.connector.parameters())
    model.zero_grad()

    dataset = _FactoryStyleDataset(batch, modalities)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        group_by_modality_length=True,
        remove_unused_columns=False,
    )
    trainer = LLaVATrainer(
        model=model,
        tokenizer=model.tokenizer,
        args=args,
        train_dataset=dataset,
        data_collator=DataCollatorForSupervisedDataset(tokenizer=model.tokenizer),
    )
    assert (getattr(trainer, "processing_class", None) or trainer.tokenizer) is model.tokenizer
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)  # the Factory's call
    if TRANSFORMERS.release >= (4, 52):  # transformers' own call since then
        assert isinstance(trainer._get_train_sampler(dataset), LengthGroupedSampler)
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler.sampler, LengthGroupedSampler)
    assert sorted(loader.batch_sampler.sampler) == list(range(len(dataset)))
    one_modality = "groups the batches by length alone" in caplog.text
    assert one_modality == (modalities != "both"), caplog.text

    connector_before = [p.detach().clone() for p in model.connector.parameters()]
    result = trainer.train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(
        not torch.equal(before, after)
        for before, after in zip(connector_before, model.connector.parameters(), strict=True)
    )


@pytest.fixture
def one_process_group(tinyllava_factory: types.ModuleType, tmp_path: Path):
    """The Factory's ``log()`` asks torch.distributed for the rank (a 1-process gloo group)
    and writes to the logger its ``train()`` sets up."""
    import torch.distributed as dist
    from tinyllava.utils import logger_setting

    logger_setting(str(tmp_path))
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _lora_recipe(tmp_path: Path, vision: str):
    from tinyllava.training_recipe.lora_recipe import LoRATrainingRecipe
    from tinyllava.utils.arguments import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], lora_r=4,
                             lora_alpha=8, tune_type_llm="lora", tune_type_vision_tower=vision,
                             tune_type_connector="full")  # fmt: skip
    return LoRATrainingRecipe(args)


def test_lora_recipe_adds_adapters_to_a_model_without_peft_config(
    tinyllava_student: torch.nn.Module, one_process_group: None, tmp_path: Path
) -> None:
    """The Factory's LoRA recipe raised AttributeError (``model.peft_config``) on every release
    it runs on; fixed, it wraps the model as it means to, and leaves no placeholder behind."""
    import peft

    model = copy.deepcopy(tinyllava_student)
    assert not hasattr(model, "peft_config")  # the breakage: present on 4.40.1 and 5.x alike
    wrapped = _lora_recipe(tmp_path, "lora")(model)
    assert isinstance(wrapped, peft.PeftModel)
    assert isinstance(wrapped.get_base_model().peft_config, dict)  # peft's, not our None
    trainable = {name.split(".")[2] for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable == {"language_model", "vision_tower", "connector"}
    assert all(
        "lora_" in name or ".connector." in name
        for name, p in wrapped.named_parameters()
        if p.requires_grad
    )


def test_lora_recipe_fix_is_a_no_op_where_the_check_works(
    tinyllava_student: torch.nn.Module, one_process_group: None, tmp_path: Path
) -> None:
    """A model that has ``peft_config`` (already PEFT-wrapped) goes to the recipe's own code,
    which keeps it as it is; fixing twice changes nothing."""
    import tinyllava.training_recipe.lora_recipe as lora_recipe

    once = lora_recipe.LoRATrainingRecipe.training_model_converse
    save = lora_recipe.LoRATrainingRecipe.save
    assert getattr(once, "_switchkd_compat", False) and getattr(save, "_switchkd_compat", False)
    # A recipe converts once (it edits its own skip list): one per call.
    wrapped = _lora_recipe(tmp_path, "frozen").training_model_converse(
        copy.deepcopy(tinyllava_student)
    )
    assert _lora_recipe(tmp_path, "frozen").training_model_converse(wrapped) is wrapped
    factory_compat._fix_lora_recipe(lora_recipe)
    assert lora_recipe.LoRATrainingRecipe.training_model_converse is once
    assert lora_recipe.LoRATrainingRecipe.save is save
