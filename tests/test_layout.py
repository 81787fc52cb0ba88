"""The package's import directions (issue 24): imports point down only.

losses/ at the bottom (torch and the standard library only), objective/ above adapters, losses,
config and constants (never the Trainer or accelerate), training/ above objective, integrations/
above training; testing/ and demo/ on top, imported by no library module; adapters/ below
objective/; demo/ through the public names, not the objective's or the Trainer's modules.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "switchkd_plugin"
TOP = ("switchkd_plugin.testing", "switchkd_plugin.demo")
FORBIDDEN = {
    "switchkd_plugin.objective": (
        "switchkd_plugin.training",
        "switchkd_plugin.integrations",
        *TOP,
        "transformers.Trainer",
        "transformers.trainer",
        "accelerate",
    ),
    "switchkd_plugin.training": ("switchkd_plugin.integrations", *TOP),
    "switchkd_plugin.adapters": (
        "switchkd_plugin.objective",
        "switchkd_plugin.training",
        "switchkd_plugin.integrations",
    ),
    # The app uses the public names (`switchkd_plugin`), adapters, constants and testing, and the
    # Factory integration for its Factory host; never the objective's or the Trainer's insides.
    "switchkd_plugin.demo": (
        "switchkd_plugin.objective",
        "switchkd_plugin.training",
        "switchkd_plugin.config",
    ),
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, package_dir: Path = PACKAGE) -> set[str]:
    """Every module (and `module.name`) that `path` imports, anywhere in it, with relative
    imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path, package_dir).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], base]).rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(package: Path = PACKAGE) -> list[str]:
    """`module imports name (rule)` for every import that points the wrong way."""
    found = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        names = imported_names(path, package)
        rules = [banned for layer, banned in FORBIDDEN.items() if _under(module, layer)]
        if not any(_under(module, top) for top in TOP):
            rules.append(TOP)  # the library never imports the app or the fixtures
        for banned in rules:
            found += [
                f"{module} imports {n}" for n in sorted(names) if any(_under(n, b) for b in banned)
            ]
        if _under(module, "switchkd_plugin.losses"):
            allowed = ("torch", "switchkd_plugin.losses", "__future__", *sys.stdlib_module_names)
            found += [
                f"{module} imports {n} (losses/: torch and the standard library only)"
                for n in sorted(names)
                if not any(_under(n, a) for a in allowed)
            ]
    return found


def test_imports_point_down_only():
    assert not violations(), "\n".join(violations())


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("objective/engine.py", "from switchkd_plugin.training.setup import engine_options"),
        ("objective/loss_stage.py", "from transformers import Trainer"),
        ("objective/teacher_calls.py", "import accelerate"),
        ("training/metrics.py", "from ..integrations.tinyllava import train"),
        ("adapters/base.py", "from switchkd_plugin.testing import build_tokenizer"),
        ("losses/rows.py", "import numpy"),
        ("adapters/hf_llava.py", "from switchkd_plugin.objective.engine import SwitchKDEngine"),
        ("demo/hosts.py", "from switchkd_plugin.training.trainer import SwitchKDTrainer"),
    ],
)
def test_a_planted_import_is_found(tmp_path, module, line):
    """Each rule catches a violation planted in a copy of the package."""
    copy = tmp_path / "switchkd_plugin"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text(target.read_text(encoding="utf-8") + f"\n{line}\n", encoding="utf-8")
    found = violations(copy)
    assert any(v.startswith(f"{module_name(target, copy)} imports ") for v in found), found
