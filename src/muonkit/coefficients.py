"""Newton-Schulz coefficient presets: frozen data with provenance.

A Newton-Schulz (NS) step maps every singular value ``x`` of the iterate through an odd polynomial

    f(x) = a x + b x^3 + c x^5 + ...

A *row* is the tuple ``(a, b, c, ...)`` of one step; a *schedule* is one row per step. A fixed
preset has a single row that is repeated; a per-step preset has one row per step, and a schedule
shorter than the number of steps asked for repeats its last row.

Every preset records where its numbers come from and how they were designed, so that
``muonkit.design`` can re-derive the designed ones and users can tell a tuned schedule from a
convergent one. Wherever a preset name is accepted, a plain sequence of rows (or one row) is too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "CoefficientSpec",
    "Preset",
    "as_preset",
    "get",
    "list_presets",
    "load_json",
    "register",
    "schedule",
    "taylor_row",
]

Row = tuple[float, ...]


@dataclass(frozen=True)
class Preset:
    """A named Newton-Schulz schedule.

    Attributes:
        name: preset name used by ``get`` and ``orthogonalize(coefficients=...)``.
        rows: one ``(a, b, c, ...)`` row per step; a schedule repeats its last row when run longer.
        source: where the numbers were published.
        design: how they were obtained (``fixed-point``, ``tuned``, ``minimax``, ``taylor``, ...).
        default_steps: the number of steps ``steps=None`` means for this preset.
        norm_scale: the input is divided by ``norm_scale * ||G||_F + eps`` before iterating
            (1.0 for most presets; Polar Express uses 1.01 as a safety margin).
        notes: anything a user should know (e.g. that the iteration does not converge to 1).
    """

    name: str
    rows: tuple[Row, ...]
    source: str
    design: str
    default_steps: int
    norm_scale: float = 1.0
    notes: str = ""
    degree: int = field(init=False)

    def __post_init__(self) -> None:
        rows = tuple(tuple(float(v) for v in r) for r in self.rows)
        if not rows:
            raise ValueError(f"preset {self.name!r}: a schedule needs at least one row")
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(
                f"preset {self.name!r}: every row must have the same number of coefficients, got lengths "
                f"{sorted(lengths)}"
            )
        (n,) = lengths
        if n < 2:
            raise ValueError(
                f"preset {self.name!r}: a row needs at least two coefficients (a, b) for a cubic "
                f"a x + b x^3; got {rows[0]}"
            )
        if not all(math.isfinite(v) for r in rows for v in r):
            raise ValueError(f"preset {self.name!r}: coefficients must be finite")
        if self.default_steps < 1:
            raise ValueError(f"preset {self.name!r}: default_steps must be >= 1")
        if not (self.norm_scale > 0 and math.isfinite(self.norm_scale)):
            raise ValueError(f"preset {self.name!r}: norm_scale must be a positive finite number")
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "degree", 2 * n - 1)

    def schedule(self, steps: int | None = None) -> tuple[Row, ...]:
        """The rows of ``steps`` NS steps (``None``: ``default_steps``), repeating the last row."""
        k = self.default_steps if steps is None else int(steps)
        if k < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        return self.rows[:k] + (self.rows[-1],) * max(0, k - len(self.rows))

    @property
    def per_step(self) -> bool:
        return len(self.rows) > 1

    def to_json(self) -> str:
        """JSON text that ``load_json`` (and ``orthogonalize(coefficients="file.json")``) reads back."""
        fields = ("name", "rows", "source", "design", "default_steps", "norm_scale", "notes")
        return json.dumps({k: getattr(self, k) for k in fields}, indent=2)


@lru_cache(maxsize=64)
def _load_json_cached(path: str, version: int) -> Preset:
    return load_json(path)


def load_json(path: str | Path) -> Preset:
    """A preset saved by ``Preset.to_json`` (e.g. by ``muonkit coeffs design --save``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        return Preset(
            name=str(data["name"]),
            rows=tuple(tuple(r) for r in data["rows"]),
            source=str(data.get("source", str(p))),
            design=str(data.get("design", "unknown")),
            default_steps=int(data.get("default_steps", len(data["rows"]) if len(data["rows"]) > 1 else 5)),
            norm_scale=float(data.get("norm_scale", 1.0)),
            notes=str(data.get("notes", "")),
        )
    except FileNotFoundError:
        raise ValueError(f"coefficient file {p} not found") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{p} is not a muonkit coefficient preset ({err})") from None


CoefficientSpec = str | Path | Preset | Sequence[float] | Sequence[Sequence[float]]

_PRESETS: dict[str, Preset] = {}


def register(preset: Preset, *, overwrite: bool = False) -> Preset:
    """Add a preset to the registry (e.g. one designed with ``muonkit.design``)."""
    if preset.name in _PRESETS and not overwrite:
        raise ValueError(f"a preset named {preset.name!r} exists already; pass overwrite=True to replace it")
    _PRESETS[preset.name] = preset
    _resolve_cached.cache_clear()
    return preset


def list_presets() -> list[str]:
    """Names of the registered presets, in registration order."""
    return list(_PRESETS)


def get(name: str) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown coefficient preset {name!r}; known presets: {', '.join(_PRESETS)}. "
            "A plain sequence of rows, e.g. [(3.4445, -4.7750, 2.0315)], is accepted too."
        ) from None


@lru_cache(maxsize=256)
def _resolve_cached(spec: object) -> Preset:
    if isinstance(spec, str):
        return get(spec)
    rows = spec  # tuple of tuples, made hashable by as_preset
    return Preset(
        name="custom",
        rows=rows,  # type: ignore[arg-type]
        source="user supplied",
        design="user",
        default_steps=len(rows) if len(rows) > 1 else 5,  # type: ignore[arg-type]
    )


def is_file_spec(spec: Any) -> bool:
    """Whether ``spec`` names a saved ``.json`` preset (read again by :func:`as_preset` whenever the file changes)."""
    return isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".json") and spec not in _PRESETS)


def as_preset(spec: CoefficientSpec) -> Preset:
    """Turn a preset name, a ``Preset``, a saved ``.json`` preset, one row or a sequence of rows into a ``Preset``.

    A custom schedule of several rows runs ``len(rows)`` steps by default; a single row runs 5.
    """
    if isinstance(spec, Preset):
        return spec
    if isinstance(spec, Path) or is_file_spec(spec):  # (the isinstance test again: it tells mypy what remains)
        # The optimizer resolves its coefficients every step: read a saved preset once per file version.
        path = Path(spec).resolve()  # type: ignore[arg-type]  # a str here (is_file_spec)
        try:
            version = path.stat().st_mtime_ns
        except FileNotFoundError:
            raise ValueError(f"coefficient file {path} not found") from None
        return _load_json_cached(str(path), version)
    if isinstance(spec, str):
        return _resolve_cached(spec)
    try:
        items: list[Any] = list(spec)
    except TypeError:
        raise TypeError(
            f"coefficients must be a preset name, a Preset or a sequence of rows, got {type(spec).__name__}"
        ) from None
    if not items:
        raise ValueError("coefficients: an empty schedule was given")
    try:
        if all(isinstance(v, (int, float)) for v in items):
            rows: tuple[Row, ...] = (tuple(float(v) for v in items),)
        else:
            rows = tuple(tuple(float(v) for v in r) for r in items)
    except (TypeError, ValueError):
        raise TypeError(f"coefficients: could not read {spec!r} as rows of numbers") from None
    return _resolve_cached(rows)


def schedule(spec: CoefficientSpec, steps: int | None = None) -> tuple[Row, ...]:
    """Shortcut for ``as_preset(spec).schedule(steps)``."""
    return as_preset(spec).schedule(steps)


def taylor_row(kappa: int) -> Row:
    """Coefficients of ``x p_kappa(x^2)``, where ``p_kappa`` truncates the Taylor series of ``lambda^(-1/2)``
    at ``lambda = 1`` after ``kappa + 1`` terms (Kim & Oh 2026): ``p_kappa(l) = sum_s c_s (1 - l)^s``,
    ``c_s = (2s)! / (4^s (s!)^2)``. Odd degree ``2 kappa + 1``: kappa = 1 gives (1.5, -0.5), kappa = 2
    gives (15/8, -10/8, 3/8). It is also the limit of the minimax polynomial as its interval shrinks to 1.
    """
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1, got {kappa}")
    coeffs = [0.0] * (kappa + 1)
    for s in range(kappa + 1):
        c_s = math.factorial(2 * s) / (4**s * math.factorial(s) ** 2)
        for j in range(s + 1):  # (1 - x^2)^s = sum_j C(s, j) (-1)^j x^(2j)
            coeffs[j] += c_s * math.comb(s, j) * (-1) ** j
    return tuple(coeffs)


# --------------------------------------------------------------------------------------------
# Built-in presets. Numbers are the published ones; ``muonkit.design`` re-derives the designed ones.
# --------------------------------------------------------------------------------------------

register(
    Preset(
        name="bernstein",
        rows=((1.5, -0.5),),
        source="Bernstein & Newhouse, 'Old Optimizer, New Norm' (arXiv 2409.20325)",
        design="fixed-point: cubic f = a x + (1 - a) x^3 with a = 1.5 (classical Newton-Schulz)",
        default_steps=5,
        notes="Converges to 1 for every singular value in (0, sqrt(3)), but slowly for small ones (phi'(0) = 1.5^k).",
    )
)
register(
    Preset(
        name="fixed_point_cubic",
        rows=((1.99, -0.99),),
        source="Jordan, 'Muon' (blog, 2024): cubic design discussion",
        design="fixed-point: cubic f = a x + (1 - a) x^3, attracting at 1 for 1 < a < 2; a = 1.99 near the edge",
        default_steps=5,
        notes="Largest slope at 0 that keeps 1 attracting; oscillates around 1 before settling.",
    )
)
register(
    Preset(
        name="fixed_point_quintic",
        rows=((3.25, -3.51, 1.26),),
        source="Jordan, 'Muon' (blog, 2024): quintic fixed-point family",
        design="fixed-point: quintic line b = 2.99 - 2a, c = a - 1.99 (f(1) = 1, f'(1) = -0.98), a = 3.25",
        default_steps=5,
    )
)
register(
    Preset(
        name="jordan",
        rows=((3.4445, -4.7750, 2.0315),),
        source="Jordan, 'Muon: An optimizer for hidden layers in neural networks' (blog, 2024); torch.optim.Muon",
        design="tuned: maximise a subject to phi staying within about [0.7, 1.3] on the working range",
        default_steps=5,
        notes="Does not converge to 1: singular values end roughly in [0.7, 1.2]; f(1) = 0.701.",
    )
)
register(
    Preset(
        name="you",
        rows=(
            (4.0848, -6.8946, 2.9270),
            (3.9505, -6.3029, 2.6377),
            (3.7418, -5.5913, 2.3037),
            (2.8769, -3.1427, 1.2046),
            (2.8366, -3.0525, 1.2012),
        ),
        source="Jiacheng You (2025), per-step rows as used in microsoft/dion",
        design="tuned: per-step rows found by numerical optimisation",
        default_steps=5,
    )
)

_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
POLAR_EXPRESS_SAFETY = 1.01


def _safety_scaled(rows: Sequence[Row], safety: float) -> tuple[Row, ...]:
    """Polar Express safety margin: x -> x / safety inside p, i.e. coefficient of x^(2i+1) / safety^(2i+1).

    Applied to every row but the last, as in the paper's released code.
    """
    scaled = tuple(tuple(v / safety ** (2 * i + 1) for i, v in enumerate(r)) for r in rows[:-1])
    return (*scaled, tuple(rows[-1]))


register(
    Preset(
        name="polar_express",
        rows=_safety_scaled(_POLAR_EXPRESS_RAW, POLAR_EXPRESS_SAFETY),
        source=(
            "Amsel, Persson, Musco, Gower, 'The Polar Express' (arXiv 2505.16932): degree 5, l = 1e-3, "
            "cushion 0.02407327424182761"
        ),
        design="minimax: greedy per-step Remez on [l_t, u_t], safety 1.01 on all rows but the last",
        default_steps=5,
        norm_scale=POLAR_EXPRESS_SAFETY,
        notes="Carries 8 rows (the last is the limit 1.875, -1.25, 0.375); 5 steps by default as in the paper's "
        "GPT-2 runs; input normalised by 1.01 * ||G||_F.",
    )
)

for _kappa in range(1, 6):
    register(
        Preset(
            name=f"taylor_{2 * _kappa + 1}",
            rows=(taylor_row(_kappa),),
            source="Kim & Oh, 'Convergence of Muon with Newton-Schulz' (arXiv 2601.19156, ICLR 2026)",
            design=f"taylor: x p_kappa(x^2), Taylor truncation of lambda^(-1/2) at 1, kappa = {_kappa}",
            default_steps=5,
            notes="Converges to 1 for every singular value in (0, 1]; the residual 1 - sigma^2 shrinks like "
            f"delta^{_kappa + 1} per step (Theorem 2), slowly for tiny singular values.",
        )
    )
