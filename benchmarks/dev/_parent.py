"""Puts ``benchmarks/`` on ``sys.path`` so that these diagnostics share ``_common`` and ``step`` with the user-facing
programs there (``import _parent`` before those imports)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
