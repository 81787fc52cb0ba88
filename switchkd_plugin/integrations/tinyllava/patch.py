"""``switchkd-patch {apply,check,revert} FACTORY_DIR``: the ``--distill NAME`` patch of TinyLLaVA
Factory, applied, checked and reverted in pure Python (no ``patch`` or ``git`` binary).

The patch is an ordinary git unified diff (``tinyllava_distill.patch`` beside this module, shipped
inside the package; ``patches/`` at the repo root links to it). Its ``index OLD..NEW`` lines give
the git blob ids of each file before and after, so a
file is recognised exactly: pristine, patched, or neither (conflicting: refused, nothing written).
All files are checked before any is written; each write goes to a temporary file renamed over the
original. Applying then reverting restores the original bytes. A file that is a symbolic link is
written through it: the link stays, its target is patched (and restored), as the state was read
from the target.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import hashlib
import io
import os
import re
import stat
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path, PurePosixPath

PATCH_NAME = "tinyllava_distill.patch"

EXIT_OK = 0  # done; for check: patched
EXIT_UNPATCHED = 1  # check only: the tree is pristine
EXIT_USAGE = 2  # bad arguments, or FACTORY_DIR holds none of the patched files
EXIT_CONFLICT = 3  # a file is neither pristine nor patched: nothing written
EXIT_WRITE_FAILED = 4  # an OS error while writing (each file is replaced whole or not at all)

_HUNK_HEADER = re.compile(rb"@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
_INDEX_LINE = re.compile(rb"index ([0-9a-f]{40})\.\.([0-9a-f]{40})(?: \d+)?\n?")


class PatchError(ValueError):
    """The patch file is malformed or does not fit the file it was checked against."""


class State(enum.Enum):
    UNPATCHED = "unpatched"
    PATCHED = "patched"
    CONFLICTING = "conflicting"
    MISSING = "missing"


@dataclasses.dataclass(frozen=True)
class Hunk:
    old_start: int  # 1-based first line, as in the header
    new_start: int
    old_lines: tuple[bytes, ...]  # with their line endings
    new_lines: tuple[bytes, ...]


@dataclasses.dataclass(frozen=True)
class FilePatch:
    path: str  # relative, POSIX
    old_blob: str  # git blob id of the pristine file
    new_blob: str  # git blob id of the patched file
    hunks: tuple[Hunk, ...]


def git_blob_id(data: bytes) -> str:
    """The id git gives a file with these bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def default_patch_path() -> Path:
    """The patch shipped inside the package (``patches/`` at the repo root links to it)."""
    return Path(str(resources.files("switchkd_plugin.integrations.tinyllava") / PATCH_NAME))


# ----------------------------------------------------------------------------------- parsing


def parse_patch(data: bytes) -> tuple[FilePatch, ...]:
    """Parse a ``git diff --full-index`` patch; text before the first ``diff --git`` is ignored."""
    lines = io.BytesIO(data).readlines()
    files: list[FilePatch] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith(b"diff --git "):
            i += 1
            continue
        i += 1
        index = _INDEX_LINE.fullmatch(lines[i]) if i < len(lines) else None
        if index is None:
            raise PatchError(f"line {i + 1}: expected 'index OLD..NEW' with full 40-hex blob ids")
        if i + 2 >= len(lines) or not (
            lines[i + 1].startswith(b"--- a/") and lines[i + 2].startswith(b"+++ b/")
        ):
            raise PatchError(f"line {i + 2}: expected '--- a/PATH' and '+++ b/PATH'")
        path = lines[i + 2][len(b"+++ b/") :].decode().rstrip("\n")
        if PurePosixPath(path).is_absolute() or ".." in PurePosixPath(path).parts:
            raise PatchError(f"unsafe path in patch: {path!r}")
        hunks, i = _parse_hunks(lines, i + 3)
        old_blob, new_blob = (group.decode() for group in index.groups())
        files.append(FilePatch(path, old_blob, new_blob, tuple(hunks)))
    if not files:
        raise PatchError("no 'diff --git' section found")
    return tuple(files)


def _parse_hunks(lines: list[bytes], i: int) -> tuple[list[Hunk], int]:
    """The hunks starting at line ``i``; returns them and the index after the last."""
    hunks = []
    while i < len(lines) and lines[i].startswith(b"@@ "):
        header = _HUNK_HEADER.match(lines[i])
        if header is None:
            raise PatchError(f"line {i + 1}: bad hunk header")
        old_start, old_count, new_start, new_count = (
            int(group) if group is not None else 1 for group in header.groups()
        )
        old: list[bytes] = []
        new: list[bytes] = []
        i += 1
        while len(old) < old_count or len(new) < new_count:
            if i == len(lines) or lines[i][:1] not in (b" ", b"-", b"+"):
                raise PatchError(f"line {i + 1}: hunk shorter than its header says")
            kind, text = lines[i][:1], lines[i][1:]
            if kind != b"+":
                old.append(text)
            if kind != b"-":
                new.append(text)
            i += 1
        hunks.append(Hunk(old_start, new_start, tuple(old), tuple(new)))
    if not hunks:
        raise PatchError(f"line {i + 1}: expected a hunk")
    return hunks, i


# ---------------------------------------------------------------------------------- applying


def apply_hunks(data: bytes, hunks: Sequence[Hunk], *, reverse: bool = False) -> bytes:
    """Apply ``hunks`` (or undo them) exactly where their headers say; no offset, no fuzz."""
    lines = io.BytesIO(data).readlines()
    out: list[bytes] = []
    position = 0
    for hunk in hunks:
        start, before, after = (
            (hunk.new_start, hunk.new_lines, hunk.old_lines)
            if reverse
            else (hunk.old_start, hunk.old_lines, hunk.new_lines)
        )
        start = start - 1 if before else start  # an empty side names the line before it
        if start < position or tuple(lines[start : start + len(before)]) != before:
            raise PatchError(f"hunk at line {start + 1} does not match")
        out += lines[position:start]
        out += after
        position = start + len(before)
    out += lines[position:]
    return b"".join(out)


def state_of(file_patch: FilePatch, factory_dir: Path) -> State:
    path = factory_dir / file_patch.path
    if not path.is_file():
        return State.MISSING
    blob = git_blob_id(path.read_bytes())
    if blob == file_patch.old_blob:
        return State.UNPATCHED
    if blob == file_patch.new_blob:
        return State.PATCHED
    return State.CONFLICTING


def tree_state(patch: Sequence[FilePatch], factory_dir: Path) -> State:
    """One state for the whole tree: mixed states count as conflicting."""
    states = {state_of(file_patch, factory_dir) for file_patch in patch}
    return states.pop() if len(states) == 1 else State.CONFLICTING


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` whole: temp file in the same directory, then rename. A link is
    written through: its target is replaced, the link left as it is."""
    path = path.resolve()
    mode = stat.S_IMODE(path.stat().st_mode)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def transform(patch: Sequence[FilePatch], factory_dir: Path, *, reverse: bool) -> None:
    """Apply (or revert) every file of a pristine (or patched) tree; all computed before writes."""
    results = []
    for file_patch in patch:
        path = factory_dir / file_patch.path
        data = apply_hunks(path.read_bytes(), file_patch.hunks, reverse=reverse)
        expected = file_patch.old_blob if reverse else file_patch.new_blob
        if git_blob_id(data) != expected:  # the hunks and the index line disagree
            raise PatchError(f"{file_patch.path}: result is not blob {expected}")
        results.append((path, data))
    for path, data in results:
        write_atomically(path, data)


# ----------------------------------------------------------------------------------- command

_EPILOG = f"""\
commands:
  apply   patch FACTORY_DIR; an already patched tree is left alone
  check   report whether FACTORY_DIR is patched, unpatched or conflicting
  revert  restore the Factory's original files exactly; an unpatched tree is left alone

exit status:
  {EXIT_OK}  done (apply, revert); patched (check)
  {EXIT_UNPATCHED}  unpatched (check)
  {EXIT_USAGE}  bad arguments, or FACTORY_DIR holds none of the files the patch changes
  {EXIT_CONFLICT}  conflicting: a file is neither the Factory's original nor the patched one
     (local edits or another Factory version); nothing was written
  {EXIT_WRITE_FAILED}  a file could not be written (each file is replaced whole or not at all)
"""


def _conflict_message(patch: Sequence[FilePatch], factory_dir: Path, patch_path: Path) -> str:
    lines = [f"{factory_dir} does not match the patch {patch_path}:"]
    for file_patch in patch:
        state = state_of(file_patch, factory_dir)
        detail = {
            State.CONFLICTING: "has local edits or comes from another Factory version (it is "
            f"neither git blob {file_patch.old_blob[:10]}, the original, nor "
            f"{file_patch.new_blob[:10]}, the patched file)",
            State.MISSING: "is missing",
        }.get(state, f"is {state.value}")
        lines.append(f"  {file_patch.path} {detail}")
    lines.append(
        "Nothing was written. Restore the Factory's file (e.g. `git checkout -- PATH`) or make "
        "the patch's changes by hand."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="switchkd-patch",
        description="Apply, check or revert the generic `--distill NAME` patch of TinyLLaVA "
        f"Factory's tinyllava/train/train.py (the patch: {default_patch_path()}).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=("apply", "check", "revert"))
    parser.add_argument("factory_dir", metavar="FACTORY_DIR", type=Path)
    args = parser.parse_args(argv)

    patch_path = default_patch_path()
    patch = parse_patch(patch_path.read_bytes())
    factory_dir: Path = args.factory_dir
    state = tree_state(patch, factory_dir)
    if state is State.MISSING:
        print(
            f"switchkd-patch: {factory_dir} is not a TinyLLaVA Factory checkout (no "
            f"{', '.join(file_patch.path for file_patch in patch)})",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if state is State.CONFLICTING:
        print(
            f"switchkd-patch: {_conflict_message(patch, factory_dir, patch_path)}", file=sys.stderr
        )
        return EXIT_CONFLICT

    if args.command == "check":
        print(f"{factory_dir}: {state.value}")
        return EXIT_OK if state is State.PATCHED else EXIT_UNPATCHED
    wanted = State.PATCHED if args.command == "apply" else State.UNPATCHED
    if state is wanted:
        print(f"{factory_dir}: already {wanted.value}, nothing to do")
        return EXIT_OK
    try:
        transform(patch, factory_dir, reverse=args.command == "revert")
    except OSError as error:
        print(f"switchkd-patch: could not write: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED
    for file_patch in patch:
        path = factory_dir / file_patch.path
        if path.is_symlink():
            print(f"{file_patch.path} is a symbolic link: wrote its target {path.resolve()}")
    print(f"{factory_dir}: {wanted.value}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
