"""Where the demo keeps what it trained, and how it writes it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

DEFAULT_CACHE_DIR = Path("~/.cache/switchkd_plugin/demo").expanduser()


def save_atomically(files: dict[Path, Any]) -> None:
    """Write each path's content (tensors with ``torch.save``, else JSON) to a temporary name,
    then move all into place: an interrupted run leaves nothing half-written behind."""
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        if path.suffix == ".pt":
            torch.save(content, temporary)
        else:
            temporary.write_text(json.dumps(content))
    for path in files:
        os.replace(path.with_suffix(".tmp"), path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict written by ``save_atomically``."""
    return torch.load(path, map_location="cpu", weights_only=True)
