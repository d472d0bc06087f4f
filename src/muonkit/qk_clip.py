"""QK-clip (the "Clip" of MuonClip): keep attention logits from growing without bound.

Kimi Team, "Kimi K2: Open Agentic Intelligence" (arXiv:2507.20534, 2025) and J. Su's note "QK-Clip" (2025):
with Muon at scale the largest pre-softmax logit ``S_max^h = max_{batch, i, j} q_i^h . k_j^h`` of some
heads keeps rising. After each optimizer step, every head whose ``S_max^h`` exceeded a threshold ``tau``
has its query and key projections shrunk:

    gamma_h = min(1, tau / S_max^h)
    W_q^h <- gamma_h^alpha W_q^h,   W_k^h <- gamma_h^(1 - alpha) W_k^h        (alpha = 1/2 in Kimi K2)

Logits are bilinear in W_q and W_k, so that head's logits scale by ``gamma_h`` and its largest one comes
back to ``tau``; heads under the threshold are untouched, and nothing changes in the forward or backward
pass. (Kimi K2's MLA variant treats the shared rotary key differently; this module covers attention with
per-head query and key projections, including grouped-query attention and fused QKV weights.)

How the logits reach it: the model calls ``clip.observe(name, q, k, scale)`` inside its attention forward
(``q``, ``k``: ``(batch, heads, tokens, head_dim)``; ``scale`` the logit scale, e.g. ``head_dim**-0.5``), or
``clip.observe_max(name, per_head_max)`` if it already has the maxima. Observations are kept on the device
(a running max, no host sync) until ``clip.apply()``, called after ``optimizer.step()``.

Non-finite logits (an overflowing or NaN forward) say nothing about how far a head is over ``tau``: scaling by
``tau / inf`` would zero the head's query and key rows. ``nonfinite="skip"`` (default) leaves such heads as they
are and counts them (``nonfinite_heads``, read with one host sync); ``"raise"`` raises ``FloatingPointError``
naming the layers and heads before any weight changes (one host sync per ``apply``), as the optimizer's own
``nonfinite`` policy does for gradients.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NONFINITE", "QKClip", "max_logits"]

NONFINITE = ("skip", "raise")


def _number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def max_logits(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """Largest logit ``scale * q_i . k_j`` of every head over batch and positions: shape ``(heads,)``.

    ``q``: ``(batch, heads, tokens, head_dim)``; ``k``: ``(batch, kv_heads, tokens, head_dim)`` with ``heads``
    a multiple of ``kv_heads`` (grouped-query attention). ``causal`` ignores the masked positions ``j > i``.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[-1] != k.shape[-1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q and k must be (batch, heads, tokens, head_dim) with heads a multiple of kv_heads; "
            f"got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = logits.shape[-2:]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1 + t_k - t_q)
        logits = logits.masked_fill(mask, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


@dataclass
class _Rows:
    """Rows ``start:stop`` of a tensor, sliced when used (so ``model.to(...)`` after registering is fine)."""

    tensor: Tensor
    start: int
    stop: int

    def get(self) -> Tensor:
        return self.tensor.detach()[self.start : self.stop]


@dataclass
class _Layer:
    q: _Rows  # (heads * head_dim, d_in) query rows
    k: _Rows  # (kv_heads * head_dim, d_in) key rows
    heads: int
    kv_heads: int
    q_bias: _Rows | None = None
    k_bias: _Rows | None = None
    seen: Tensor | None = field(default=None, repr=False)  # running max of logits per head


def _whole(t: Tensor) -> _Rows:
    return _Rows(t, 0, t.shape[0])


class QKClip:
    """Per-head QK-clip applied after each optimizer step (see the module docstring).

    Args:
        tau: logit threshold (Kimi K2 used 100).
        alpha: share of the shrink that goes to the query (``gamma^alpha``); the key gets ``gamma^(1-alpha)``.
        nonfinite: what a head whose observed maximum is NaN or infinite gets: ``"skip"`` (left untouched and
            counted in ``nonfinite_heads``) or ``"raise"`` (``FloatingPointError``, nothing changed).

    Register each attention layer once (``register`` for separate q/k projections, ``register_fused`` for
    one ``(q; k; v)`` weight), report its logits every forward, call ``apply()`` after ``optimizer.step()``.
    """

    def __init__(self, tau: float = 100.0, alpha: float = 0.5, nonfinite: str = "skip"):
        if not (_number(tau) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        if not (_number(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.nonfinite = nonfinite
        self.layers: dict[str, _Layer] = {}
        self._skipped: Tensor | None = None  # device count of skipped heads (no host sync while counting)

    @property
    def nonfinite_heads(self) -> int:
        """How many (layer, head) observations were skipped for a non-finite maximum (one host sync)."""
        return 0 if self._skipped is None else int(self._skipped)

    def register(
        self,
        name: str,
        q_weight: Tensor,
        k_weight: Tensor,
        heads: int,
        kv_heads: int | None = None,
        q_bias: Tensor | None = None,
        k_bias: Tensor | None = None,
    ) -> None:
        """A layer whose query/key projections are ``nn.Linear`` weights ``(heads*head_dim, d_in)``."""
        self._register(
            name,
            _whole(q_weight),
            _whole(k_weight),
            heads,
            kv_heads,
            None if q_bias is None else _whole(q_bias),
            None if k_bias is None else _whole(k_bias),
        )

    def _register(
        self, name: str, q: _Rows, k: _Rows, heads: int, kv_heads: int | None, qb: _Rows | None, kb: _Rows | None
    ) -> None:
        q_rows, k_rows = q.stop - q.start, k.stop - k.start
        kv_heads = heads if kv_heads is None else kv_heads
        if name in self.layers:
            raise ValueError(f"{name}: a QK-clip layer of this name is registered already")
        if not all(isinstance(h, int) and not isinstance(h, bool) for h in (heads, kv_heads)):
            raise ValueError(f"{name}: heads and kv_heads must be ints, got {heads!r} and {kv_heads!r}")
        for what, rows in (("query", q), ("key", k)):
            if rows.tensor.ndim < 2:
                raise ValueError(
                    f"{name}: the {what} weight must have a row per output, got shape {tuple(rows.tensor.shape)}"
                )
        for what, rows, bias in (("query", q, qb), ("key", k, kb)):
            if bias is not None and (bias.tensor.ndim != 1 or bias.stop - bias.start != rows.stop - rows.start):
                raise ValueError(f"{name}: the {what} bias must be 1-D with one entry per {what} row")
        if heads < 1 or kv_heads < 1 or heads % kv_heads:
            raise ValueError(f"{name}: heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
        if q_rows % heads or k_rows % kv_heads:
            raise ValueError(f"{name}: q rows {q_rows} / k rows {k_rows} do not split into {heads} / {kv_heads} heads")
        if q_rows // heads != k_rows // kv_heads:
            raise ValueError(f"{name}: query and key head sizes differ")
        self.layers[name] = _Layer(q, k, heads, kv_heads, qb, kb)

    def register_fused(
        self, name: str, qkv_weight: Tensor, heads: int, kv_heads: int | None = None, qkv_bias: Tensor | None = None
    ) -> None:
        """A layer with one fused weight whose rows are ``[q (heads*d); k (kv_heads*d); v (kv_heads*d)]``."""
        kv_heads = heads if kv_heads is None else kv_heads
        rows = qkv_weight.shape[0]
        if rows % (heads + 2 * kv_heads):
            raise ValueError(f"{name}: {rows} rows do not split into q/k/v of {heads}/{kv_heads}/{kv_heads} heads")
        d = rows // (heads + 2 * kv_heads)
        q, k = _Rows(qkv_weight, 0, heads * d), _Rows(qkv_weight, heads * d, (heads + kv_heads) * d)
        qb = kb = None
        if qkv_bias is not None:
            qb, kb = _Rows(qkv_bias, 0, heads * d), _Rows(qkv_bias, heads * d, (heads + kv_heads) * d)
        self._register(name, q, k, heads, kv_heads, qb, kb)

    def observe(self, name: str, q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> None:
        """Record this forward's per-head maximum logit of layer ``name`` (no host sync)."""
        with torch.no_grad():
            self.observe_max(name, max_logits(q.detach(), k.detach(), scale, causal))

    def observe_max(self, name: str, per_head: Tensor) -> None:
        """Record precomputed per-head maxima (shape ``(heads,)``) for layer ``name``."""
        layer = self._layer(name)
        if per_head.shape != (layer.heads,):
            raise ValueError(f"{name}: expected {layer.heads} per-head maxima, got shape {tuple(per_head.shape)}")
        per_head = per_head.detach().float()
        layer.seen = per_head.clone() if layer.seen is None else torch.maximum(layer.seen, per_head)

    @torch.no_grad()
    def apply(self) -> dict[str, Tensor]:
        """Shrink the q/k rows of every head whose observed maximum exceeded ``tau``; forget the observations.

        Returns each observed layer's ``gamma`` per head (device tensors; 1 where nothing was clipped).
        """
        observed = {name: (layer, layer.seen) for name, layer in self.layers.items() if layer.seen is not None}
        if self.nonfinite == "raise":
            flags = {name: (~torch.isfinite(seen)).nonzero().flatten().tolist() for name, (_, seen) in observed.items()}
            flags = {name: heads for name, heads in flags.items() if heads}
            if flags:
                for layer, _ in observed.values():
                    layer.seen = None
                raise FloatingPointError(
                    f"non-finite attention logits in {', '.join(f'{n} (heads {h})' for n, h in flags.items())}; "
                    "no weight was changed (QKClip(nonfinite='skip') leaves such heads untouched instead)"
                )
        gammas = {}
        for name, (layer, seen) in observed.items():
            finite = torch.isfinite(seen)
            skipped = (~finite).sum()
            self._skipped = skipped if self._skipped is None else self._skipped + skipped
            gamma = (self.tau / seen.clamp_min(1e-30)).clamp(max=1.0)
            gamma = torch.where(finite & (seen > self.tau), gamma, torch.ones_like(gamma))
            group = layer.heads // layer.kv_heads
            # a shared key head shrinks by its most-clipped query head, so every head ends at or below tau
            kv_gamma = gamma.view(layer.kv_heads, group).amin(dim=1)
            self._scale_rows(layer.q, layer.q_bias, gamma.pow(self.alpha), layer.heads)
            self._scale_rows(layer.k, layer.k_bias, kv_gamma.pow(1 - self.alpha), layer.kv_heads)
            layer.seen = None
            gammas[name] = gamma
        return gammas

    @staticmethod
    def _scale_rows(rows: _Rows, bias: _Rows | None, factor: Tensor, heads: int) -> None:
        weight = rows.get()
        per_row = factor.to(weight.device).repeat_interleave(weight.shape[0] // heads)
        weight.mul_(per_row.to(weight.dtype).view(-1, *([1] * (weight.ndim - 1))))
        if bias is not None:
            b = bias.get()
            b.mul_(per_row.to(b.device, b.dtype))

    def _layer(self, name: str) -> _Layer:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no QK-clip layer named {name!r}; registered: {sorted(self.layers)}") from None
