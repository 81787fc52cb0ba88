"""The `--distill NAME` patch of TinyLLaVA Factory and the `switchkd-patch` command.

The patch tests work on a scratch copy of the Factory's ``tinyllava`` package, found through
``TINYLLAVA_FACTORY_DIR`` or else the importable ``tinyllava``; they skip, with the reason, when
there is none. Running the patched ``train.py`` also needs the Factory importable (``conftest``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import transformers

from switchkd_plugin.integrations.tinyllava import patch as factory_patch
from switchkd_plugin.integrations.tinyllava.patch import (
    EXIT_CONFLICT,
    EXIT_OK,
    EXIT_UNPATCHED,
    EXIT_USAGE,
    EXIT_WRITE_FAILED,
    PatchError,
    main,
    parse_patch,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = "tinyllava/train/train.py"
STRATEGY = "throwaway"  # the entry-point name the tests register


def _find_factory_checkout() -> tuple[Path | None, str]:
    """(root, "") of a Factory checkout, or (None, why not)."""
    configured = os.environ.get("TINYLLAVA_FACTORY_DIR")
    if configured:
        root, origin = Path(configured), "TINYLLAVA_FACTORY_DIR"
    else:
        spec = importlib.util.find_spec("tinyllava")
        if spec is None or not spec.submodule_search_locations:
            return None, (
                "no TinyLLaVA Factory checkout: set TINYLLAVA_FACTORY_DIR or put one on PYTHONPATH"
            )
        root = Path(next(iter(spec.submodule_search_locations))).parent
        origin = "the importable tinyllava package"
    if not (root / TRAIN_PY).is_file():
        return None, f"{origin} ({root}) has no {TRAIN_PY}"
    return root, ""


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden and temporary ones too) and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def factory(tmp_path: Path) -> Path:
    """A scratch Factory tree (its ``tinyllava`` package), unpatched."""
    checkout, why_not = _find_factory_checkout()
    if checkout is None:
        pytest.skip(why_not)
    root = tmp_path / "TinyLLaVA_Factory"
    shutil.copytree(
        checkout / "tinyllava", root / "tinyllava", ignore=shutil.ignore_patterns("__pycache__")
    )
    patch = parse_patch(factory_patch.default_patch_path().read_bytes())
    state = factory_patch.tree_state(patch, root)
    if state is factory_patch.State.PATCHED:  # the user patched their checkout: start pristine
        factory_patch.transform(patch, root, reverse=True)
    elif state is not factory_patch.State.UNPATCHED:
        pytest.skip(f"{checkout / TRAIN_PY} is {state.value}: these tests need the Factory's own")
    return root


@pytest.fixture
def strategy_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A throwaway installed distribution registering ``throwaway`` in ``tinyllava.distill``.

    Its module prepares the Factory as a real strategy's plugin would (``factory_compat``) and
    records whether the Factory was imported before it; its ``train()`` prints what it saw.
    """
    site = tmp_path / "site"
    dist_info = site / "throwaway_strategy-0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: throwaway-strategy\nVersion: 0\n"
    )
    (dist_info / "entry_points.txt").write_text(
        f"[tinyllava.distill]\n{STRATEGY} = throwaway_strategy:train\n"
    )
    (site / "throwaway_strategy.py").write_text(
        textwrap.dedent(
            """\
            import json
            import sys

            from switchkd_plugin.integrations.tinyllava.compat import install

            FACTORY_IMPORTED_FIRST = "tinyllava" in sys.modules
            install()


            def train():
                seen = {"argv": sys.argv[1:], "factory_imported_first": FACTORY_IMPORTED_FIRST}
                print("STRATEGY " + json.dumps(seen))
                return "trained"
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("throwaway_strategy", None)


def _run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ----------------------------------------------------------------------------- the patch file


def test_the_patch_is_generic_and_where_the_readme_says() -> None:
    shipped = factory_patch.default_patch_path()
    assert (REPO / "patches" / factory_patch.PATCH_NAME).read_bytes() == shipped.read_bytes()
    assert "switch" not in shipped.read_text().lower()
    (file_patch,) = parse_patch(shipped.read_bytes())
    assert file_patch.path == TRAIN_PY


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b"just text\n", "no 'diff --git'"),
        (b"diff --git a/x b/x\n--- a/x\n+++ b/x\n", "index"),
        (b"diff --git a/x b/x\nindex " + b"0" * 40 + b".." + b"1" * 40 + b"\n--- a/x\n", "PATH"),
        (
            b"diff --git a/x b/x\nindex " + b"0" * 40 + b".." + b"1" * 40 + b" 100644\n"
            b"--- a/x\n+++ b/x\n@@ -1,2 +1,2 @@\n-a\n+b\n",
            "shorter",
        ),
        (
            b"diff --git a/../x b/../x\nindex " + b"0" * 40 + b".." + b"1" * 40 + b"\n"
            b"--- a/../x\n+++ b/../x\n@@ -1 +1 @@\n-a\n+b\n",
            "unsafe",
        ),
    ],
)
def test_malformed_patches_are_rejected(text: bytes, error: str) -> None:
    with pytest.raises(PatchError, match=error):
        parse_patch(text)


def test_the_result_equals_git_apply(factory: Path, tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None:
        pytest.skip("git is not installed (only this cross-check needs it)")
    by_git = tmp_path / "by_git"
    shutil.copytree(factory, by_git)
    subprocess.run([git, "init", "-q", "."], cwd=by_git, check=True)
    subprocess.run([git, "apply", str(factory_patch.default_patch_path())], cwd=by_git, check=True)
    assert main(["apply", str(factory)]) == EXIT_OK
    assert (factory / TRAIN_PY).read_bytes() == (by_git / TRAIN_PY).read_bytes()


# ----------------------------------------------------------------------------------- command


def test_apply_check_revert_round_trip_is_byte_identical(
    factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    original = _snapshot(factory)
    assert _run(capsys, "check", factory) == (EXIT_UNPATCHED, f"{factory}: unpatched\n", "")
    assert _run(capsys, "apply", factory) == (EXIT_OK, f"{factory}: patched\n", "")
    patched = _snapshot(factory)
    assert set(patched) == set(original)
    assert [name for name in original if patched[name] != original[name]] == [TRAIN_PY]
    assert _run(capsys, "check", factory)[0] == EXIT_OK
    assert _run(capsys, "revert", factory) == (EXIT_OK, f"{factory}: unpatched\n", "")
    assert _snapshot(factory) == original


def test_a_linked_train_py_is_patched_and_restored_through_the_link(
    factory: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tree whose train.py is a symbolic link (e.g. shared between checkouts): the link stays
    a link to the same file, whose bytes are patched, then restored."""
    target = tmp_path / "shared" / "train.py"
    target.parent.mkdir()
    link = factory / TRAIN_PY
    original = link.read_bytes()
    link.rename(target)
    link.symlink_to(os.path.relpath(target, link.parent))
    link_text = os.readlink(link)
    patch = parse_patch(factory_patch.default_patch_path().read_bytes())
    for command, blob in (("apply", patch[0].new_blob), ("revert", patch[0].old_blob)):
        code, out, err = _run(capsys, command, factory)
        assert (code, err) == (EXIT_OK, "")
        assert link.is_symlink() and os.readlink(link) == link_text, f"{command}: link replaced"
        assert f"{TRAIN_PY} is a symbolic link: wrote its target {target.resolve()}" in out
        assert factory_patch.git_blob_id(target.read_bytes()) == blob
        assert not [p.name for p in target.parent.iterdir() if p != target]  # no temp file left
    assert target.read_bytes() == original


def test_apply_and_revert_twice_are_no_ops(
    factory: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_py = factory / TRAIN_PY
    for command, state in (("apply", "patched"), ("revert", "unpatched")):
        assert _run(capsys, command, factory)[0] == EXIT_OK
        written = train_py.stat()
        code, out, _ = _run(capsys, command, factory)
        assert (code, out) == (EXIT_OK, f"{factory}: already {state}, nothing to do\n")
        now = train_py.stat()
        assert (now.st_ino, now.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)  # untouched


@pytest.mark.parametrize("start", ["unpatched", "patched"])
def test_a_conflicting_tree_is_refused_and_nothing_written(
    factory: Path, capsys: pytest.CaptureFixture[str], start: str
) -> None:
    if start == "patched":
        assert _run(capsys, "apply", factory)[0] == EXIT_OK
    with (factory / TRAIN_PY).open("a") as file:
        file.write("# a local edit\n")
    before = _snapshot(factory)
    for command in ("apply", "revert", "check"):
        code, out, err = _run(capsys, command, factory)
        assert (code, out) == (EXIT_CONFLICT, "")
        assert f"{TRAIN_PY} has local edits" in err
        assert "Nothing was written" in err
        assert _snapshot(factory) == before


def test_a_directory_without_the_factory_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "apply", tmp_path)
    assert code == EXIT_USAGE
    assert f"not a TinyLLaVA Factory checkout (no {TRAIN_PY})" in err


def test_a_failed_write_leaves_the_file_whole(
    factory: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _snapshot(factory)

    def fail(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(factory_patch.os, "replace", fail)
    code, _, err = _run(capsys, "apply", factory)
    assert code == EXIT_WRITE_FAILED
    assert "disk full" in err
    assert _snapshot(factory) == before  # no half-written file, no temporary file left


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for code in (EXIT_OK, EXIT_UNPATCHED, EXIT_USAGE, EXIT_CONFLICT, EXIT_WRITE_FAILED):
        assert f"\n  {code}  " in out


# --------------------------------------------------------------------- the patched train.py


class _ParserReached(Exception):
    """Raised where the Factory's own training path parses its arguments."""


@pytest.fixture
def parser_argv(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ``sys.argv`` each call of ``HfArgumentParser.parse_args_into_dataclasses`` saw; the
    call then raises ``_ParserReached`` (nothing is trained)."""
    seen: list[list[str]] = []

    def parse_args_into_dataclasses(self: object, *args: object, **kwargs: object) -> None:
        seen.append(list(sys.argv))
        raise _ParserReached

    monkeypatch.setattr(
        transformers.HfArgumentParser, "parse_args_into_dataclasses", parse_args_into_dataclasses
    )
    return seen


def _import_train_py(factory: Path) -> types.ModuleType:
    """The scratch tree's train.py as a module (the Factory's other modules: the importable)."""
    spec = importlib.util.spec_from_file_location("scratch_tinyllava_train", factory / TRAIN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def patched_train(
    factory: Path, tinyllava_factory: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> types.ModuleType:
    assert main(["apply", str(factory)]) == EXIT_OK
    monkeypatch.setattr(sys, "argv", ["train.py"])
    return _import_train_py(factory)


@pytest.mark.parametrize(
    "distill", [[], ["--distill", "none"], ["--distill=none"]], ids=["absent", "none", "=none"]
)
def test_without_a_strategy_the_factory_trains_as_before(
    patched_train: types.ModuleType,
    parser_argv: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    distill: list[str],
) -> None:
    factory_args = ["--output_dir", "out", "--bf16", "True"]
    monkeypatch.setattr(sys, "argv", ["train.py", factory_args[0], *distill, *factory_args[1:]])
    with pytest.raises(_ParserReached):
        patched_train.train()
    assert parser_argv == [["train.py", *factory_args]]


@pytest.mark.parametrize("form", ["separate", "joined"])
def test_a_distill_name_runs_the_registered_strategy(
    patched_train: types.ModuleType,
    strategy_site: Path,
    parser_argv: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    form: str,
) -> None:
    distill = ["--distill", STRATEGY] if form == "separate" else [f"--distill={STRATEGY}"]
    monkeypatch.setattr(sys, "argv", ["train.py", "--output_dir", "out", *distill, "--x", "1"])
    assert patched_train.train() == "trained"
    seen = json.loads(capsys.readouterr().out.removeprefix("STRATEGY "))
    assert seen["argv"] == ["--output_dir", "out", "--x", "1"]
    assert parser_argv == []  # the Factory's own path did not run


def test_an_unknown_name_lists_the_installed_strategies(
    factory: Path,
    patched_train: types.ModuleType,
    strategy_site: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "--distill", "nope"])
    with pytest.raises(SystemExit, match=rf"--distill nope: no such .*installed.*{STRATEGY}"):
        patched_train.train()
    monkeypatch.setattr(sys, "argv", ["train.py", "--distill", "nope"])
    with pytest.raises(SystemExit, match="--distill nope"):  # already when the script loads
        _import_train_py(factory)
    monkeypatch.setattr(sys, "argv", ["train.py", "--distill"])
    with pytest.raises(SystemExit, match="--distill needs a NAME"):
        patched_train.train()


def test_the_script_loads_the_strategy_before_the_factory(
    factory: Path, strategy_site: Path, tinyllava_factory: types.ModuleType
) -> None:
    """As the Factory's shell scripts run it: ``python tinyllava/train/train.py ...``. The plugin
    comes first, so its fixes let the Factory import (Python >= 3.11, newer transformers)."""
    assert main(["apply", str(factory)]) == EXIT_OK
    env = {
        **os.environ,
        # The caller's path after ours: dependencies installed aside (e.g. einops-exts).
        "PYTHONPATH": os.pathsep.join(
            [str(factory), str(strategy_site), os.environ.get("PYTHONPATH", "")]
        ),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(factory / TRAIN_PY), "--distill", STRATEGY, "--output_dir", "out"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("STRATEGY "))
    seen = json.loads(line.removeprefix("STRATEGY "))
    assert seen == {"argv": ["--output_dir", "out"], "factory_imported_first": False}
