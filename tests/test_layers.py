"""The package's layers import downward only, and every module imports first on its own (no import cycles).

Layers, lowest first (a module may import its own layer and those below it, never one above):

0. data and the lab: ``coefficients``, ``reference``, ``design``, ``monitor``, ``qk_clip``
1. acceleration: ``accel`` (Triton kernels, fused passes, CUDA graphs), which the math can run without
2. the orthogonalizer: ``newton_schulz``
3. the optimizer: ``optim`` (functional step, ``Muon``, grouping, the sharded step paths ``Muon`` takes itself)
4. ``distributed``: executors that spread replicated work over ranks
5. applications: ``theory``, ``train``, ``integrations``, ``commands``, ``cli`` and the package root
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import muonkit

SRC = Path(muonkit.__file__).parent
LAYERS = [
    ("coefficients", "reference", "design", "monitor", "qk_clip"),
    ("accel",),
    ("newton_schulz",),
    ("optim",),
    ("distributed",),
    ("theory", "train", "integrations", "commands", "cli", "__main__", ""),
]


def _name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    head = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _imports(source: str, module: str, is_package: bool) -> set[str]:
    """The muonkit modules that ``source`` (module ``module``) imports, at the top or inside functions."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "muonkit":  # ``from pkg import module`` imports the module; else pkg
                modules = [f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")]
                found.update(modules or [target])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "muonkit")
    return found


def _is_module(name: str) -> bool:
    path = SRC.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _upward(source: str, module: str, is_package: bool = False) -> list[str]:
    layer = _layer(module)
    return [
        f"{module} (layer {layer}) imports {target} (layer {_layer(target)})"
        for target in sorted(_imports(source, module, is_package))
        if _layer(target) > layer
    ]


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_every_module_is_in_a_layer_and_imports_only_downward():
    upward = [v for p in _modules() for v in _upward(p.read_text(), _name(p), p.name == "__init__.py")]
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_the_rule_catches_upward_imports():
    """The checker itself: relative, absolute and function-level imports of a higher layer are reported."""
    lazy = "def f():\n    import muonkit.distributed\n"
    assert _upward("from .optim import Muon\n", "muonkit.newton_schulz") == [
        "muonkit.newton_schulz (layer 2) imports muonkit.optim (layer 3)"
    ]
    assert _upward("from ..distributed import local\n", "muonkit.optim.muon") == [
        "muonkit.optim.muon (layer 3) imports muonkit.distributed (layer 4)"
    ]
    assert _upward(lazy, "muonkit.optim.functional") == [
        "muonkit.optim.functional (layer 3) imports muonkit.distributed (layer 4)"
    ]
    assert _upward("from . import grouping\nfrom ..newton_schulz import orthogonalize\n", "muonkit.optim.muon") == []


def test_every_module_imports_first_in_a_fresh_interpreter():
    """Each module imported before any other muonkit module (a cycle fails only in some import orders). One
    interpreter, with every ``muonkit`` entry dropped from ``sys.modules`` before each import (torch stays)."""
    names = [_name(p) for p in _modules() if p.name != "__main__.py"]
    script = (
        "import importlib, json, sys, traceback\n"
        "import torch\n"
        "failed = {}\n"
        f"for name in {names!r}:\n"
        "    for k in [k for k in sys.modules if k == 'muonkit' or k.startswith('muonkit.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=-3)\n"
        "print(json.dumps(failed))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
