"""On/off switches of muonkit's CUDA paths, read from the environment when a module is imported."""

from __future__ import annotations

import os

OFF = ("0", "false", "off")


def switch(name: str) -> bool:
    """Whether the switch ``name`` (on unless set) is on: any value but ``0``, ``false`` or ``off``."""
    return os.environ.get(name, "1") not in OFF
