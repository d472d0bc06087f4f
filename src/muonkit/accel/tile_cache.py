"""The symmetric-product kernel's timed tile choices (``kernels._best``), kept on disk between processes.

Timing the tile sizes for an optimizer's NS batches is most of what building a ``Muon`` on CUDA costs once
Triton's own cache holds the compiled kernels (2.3 s of 4.3 s before the first step ended, for a 12 x 768 GPT on an
H200). The choice is a property of the GPU, the shape and the software, so it is kept in one JSON file per torch and
Triton version and per set of candidate configurations, under ``MUONKIT_CACHE_DIR`` (default
``$XDG_CACHE_HOME/muonkit``, else ``~/.cache/muonkit``); ``MUONKIT_CACHE_DIR=off`` (or ``0``, ``false``, ``""``)
keeps it in memory only. Each key names the GPU, so one file serves several GPU models. A file that cannot be read,
or is not what this version writes, is ignored (and replaced on the next write); one that cannot be written is
left alone: the cache only ever saves time, it never stops a step.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["ENV", "directory", "load", "path", "save"]

ENV = "MUONKIT_CACHE_DIR"
OFF = ("", "0", "off", "false")
FORMAT = 1
_DTYPES = {str(d): d for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def directory() -> Path | None:
    """Where the cache lives, read from the environment now (``None``: off)."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "muonkit"


def _versions(configs: Any) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - the cache is only used where the kernel runs
        triton_version = None
    configs = [list(c) for c in configs]
    return {"format": FORMAT, "torch": torch.__version__, "triton": triton_version, "configs": configs}


def path(configs: Any) -> Path | None:
    """The file for these candidate ``configs`` and the installed torch and Triton (``None``: off)."""
    where = directory()
    if where is None:
        return None
    v = _versions(configs)
    tag = f"{v['torch']}-{v['triton']}-{hashlib.sha1(json.dumps(v['configs']).encode()).hexdigest()[:8]}"
    return where / f"tiles-{''.join(c if c.isalnum() or c in '.-' else '_' for c in tag)}.json"


def _encode(key: tuple) -> list:
    return [str(x) if isinstance(x, torch.dtype) else x for x in key]


def _decode(item: list) -> tuple:
    return tuple(_DTYPES.get(x, x) if isinstance(x, str) else x for x in item)


def load(configs: Any) -> dict[tuple, tuple]:
    """The choices saved for ``configs`` (those among them only), or ``{}`` where there is no usable file."""
    file = path(configs)
    if file is None:
        return {}
    try:
        data = json.loads(file.read_text())
        if data.get("versions") != _versions(configs):
            return {}
        allowed = {tuple(c) for c in configs}
        choices = {_decode(k): tuple(c) for k, c in data["choices"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}
    return {k: c for k, c in choices.items() if c in allowed}


def save(configs: Any, choices: dict[tuple, tuple]) -> bool:
    """Write ``choices`` (merged with what the file holds now: another process may have added some) atomically;
    whether it was written."""
    file = path(configs)
    if file is None or not choices:
        return False
    merged = {**load(configs), **choices}
    data = {"versions": _versions(configs), "choices": [[_encode(k), list(c)] for k, c in merged.items()]}
    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=".tiles-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, file)  # readers see the old file or the new one, never half of one
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False
    return True
