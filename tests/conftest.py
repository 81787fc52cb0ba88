"""Shared fixtures: the tiny tokenizer and tiny teacher/student models of both hosts.

Everything is built offline from configs (random weights, fixed seeds), once per session.
TinyLLaVA fixtures skip, with the reason, where TinyLLaVA Factory cannot be imported (not on
PYTHONPATH, or a transformers release it does not support, such as 5.x).
"""

from __future__ import annotations

import os

# Everything is built offline: never let a typo turn into a model-hub request.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import types
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from switchkd_plugin.integrations.tinyllava.compat import import_tinyllava
from switchkd_plugin.testing import build_hf_llava, build_tinyllava, build_tokenizer
from switchkd_plugin.testing import student_spec as _student_spec
from switchkd_plugin.testing import teacher_spec as _teacher_spec

# The test models are tiny: one thread is fastest, and two OpenMP threads on a 2-core machine
# that is doing anything else spin-wait for each other (a 6 s test took 200 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> transformers.PreTrainedTokenizerBase:
    return build_tokenizer()


@pytest.fixture(scope="session")
def hf_student(tiny_tokenizer: transformers.PreTrainedTokenizerBase) -> nn.Module:
    return build_hf_llava(_student_spec(), tiny_tokenizer)


@pytest.fixture(scope="session")
def hf_teacher(tiny_tokenizer: transformers.PreTrainedTokenizerBase) -> nn.Module:
    return build_hf_llava(_teacher_spec(), tiny_tokenizer)


@pytest.fixture(scope="session")
def tinyllava_factory() -> types.ModuleType:
    try:
        return import_tinyllava()
    except Exception as exc:  # not on the path, or unsupported transformers: both mean "absent"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        pytest.skip(
            f"TinyLLaVA Factory not importable ({type(exc).__name__}: {first_line}); put its "
            "checkout on PYTHONPATH, with peft and deepspeed installed "
            f"(transformers installed: {transformers.__version__})"
        )


@pytest.fixture(scope="session")
def factory_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("factory_models")


@pytest.fixture(scope="session")
def tinyllava_student(
    tinyllava_factory: types.ModuleType,
    tiny_tokenizer: transformers.PreTrainedTokenizerBase,
    factory_workdir: Path,
) -> nn.Module:
    return build_tinyllava(_student_spec(), tiny_tokenizer, factory_workdir)


@pytest.fixture(scope="session")
def tinyllava_teacher(
    tinyllava_factory: types.ModuleType,
    tiny_tokenizer: transformers.PreTrainedTokenizerBase,
    factory_workdir: Path,
) -> nn.Module:
    return build_tinyllava(_teacher_spec(), tiny_tokenizer, factory_workdir)


@pytest.fixture(params=["hf_llava", "tinyllava"])
def models(request: pytest.FixtureRequest) -> tuple[nn.Module, nn.Module]:
    """(student, teacher) of one host: fresh copies (tests may train them), teacher frozen."""
    prefix = "hf" if request.param == "hf_llava" else "tinyllava"
    student = request.getfixturevalue(f"{prefix}_student")
    teacher = request.getfixturevalue(f"{prefix}_teacher")
    return copy.deepcopy(student).train(), copy.deepcopy(teacher).requires_grad_(False).eval()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps mixed precision and accumulation steps in process-wide singletons, and
    TrainingArguments exports them as ACCELERATE_* variables: a Trainer built by one test must
    not configure the next test's."""
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
