"""Which parameters take Muon and which take AdamW, decided from the model.

Rules, applied in order to every trainable parameter (``requires_grad=False`` ones are left out):

1. a name matching one of ``adamw`` patterns -> AdamW; one of ``muon`` patterns -> Muon;
2. 0-D and 1-D parameters (biases, norm gains, scalars) -> AdamW, and so are parameters with at most one
   dimension larger than 1 (a ViT ``cls_token`` of shape ``(1, 1, d)``);
3. parameters of ``nn.Embedding``/``nn.EmbeddingBag`` (also when tied to an output layer) -> AdamW, and learned
   embeddings or tokens held as bare parameters, by name (``EMBEDDING_NAMES``: ``pos_embed``,
   ``position_embeddings``, ``mask_token``, ...);
4. the output head -> AdamW (see ``head`` below);
5. every other parameter with 2+ dims -> Muon. Conv kernels (``nn.Conv*``) are flattened to
   ``(out, in*kh*kw)``; other parameters with 3+ dims are batches of matrices (``matrix_view="batch"``,
   e.g. MoE expert stacks ``(experts, d_in, d_out)``). ``nn.MultiheadAttention``'s fused ``in_proj_weight`` is
   split into its query, key and value blocks unless ``split`` says otherwise.

A ``split`` that does not fit a parameter's shape is refused here, as ``Muon`` would refuse it.

Patterns are ``fnmatch`` globs on the qualified parameter name (``"blocks.*.attn.qkv.weight"``).
This follows practice (Jordan 2024; Liu et al. 2025): Muon for hidden matrices, AdamW for the
embedding, the head and 1-D parameters.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .parts import SplitSpec, matrix_parts, split_key

__all__ = ["EMBEDDING_NAMES", "HEAD_NAMES", "ParamPlan", "classify", "describe", "param_groups"]

HEAD_NAMES = ("lm_head", "head", "classifier", "score", "fc_out", "output_head", "out_head")
# bare parameters that are learned embeddings or tokens (ViT, BERT, MAE, DeiT, registers), by their last name part
EMBEDDING_NAMES = ("pos_embed", "pos_embedding", "pos_emb", "position_embedding", "position_embeddings",
                   "absolute_pos_embed", "cls_token", "dist_token", "mask_token", "register_tokens")  # fmt: skip


@dataclass(frozen=True)
class ParamPlan:
    """Where one parameter goes and why."""

    name: str
    param: Tensor
    algorithm: str  # "muon" | "adamw"
    reason: str
    matrix_view: str = "flatten"
    split: SplitSpec = None


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pat) for pat in patterns)


def _as_patterns(patterns: str | Iterable[str]) -> tuple[str, ...]:
    return (patterns,) if isinstance(patterns, str) else tuple(patterns)


def _head_params(model: nn.Module, head: str | Sequence[str] | None) -> set[int]:
    """ids of the parameters of the output head.

    ``"auto"``: Linear modules named like a head (``HEAD_NAMES``, e.g. ``lm_head``); failing that,
    the last registered Linear whose ``out_features`` equals an embedding's vocabulary size; failing
    that, in a model without embeddings, the last registered module with parameters of its own if it is a
    Linear or a convolution (the classifier of an MLP or CNN, a 1x1-conv classifier). A model that ends in a
    norm (a transformer block, a trunk without its head) has no head then.
    Names/patterns select modules explicitly; ``None`` selects none.
    """
    if head is None:
        return set()
    modules = list(model.named_modules())
    if head != "auto":
        pats = _as_patterns(head)
        chosen = [m for n, m in modules if _matches(n, pats)]
        if not chosen:
            raise ValueError(f"head={head!r} matches no module of the model")
        return {id(p) for m in chosen for p in m.parameters()}
    linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
    vocab = {m.num_embeddings for _, m in modules if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    chosen = [m for n, m in linears if n.rsplit(".", 1)[-1] in HEAD_NAMES]
    if not chosen:
        to_vocab = [m for _, m in linears if m.out_features in vocab]
        inside_attention = {id(c) for _, m in modules if isinstance(m, nn.MultiheadAttention) for c in m.modules()}
        owning = [m for _, m in modules if any(True for _ in m.parameters(recurse=False))]
        owning = [m for m in owning if id(m) not in inside_attention]  # an attention's out_proj is no head
        last = owning[-1:] if owning and isinstance(owning[-1], (nn.Linear, nn.modules.conv._ConvNd)) else []
        chosen = to_vocab[-1:] if vocab else last
    return {id(p) for m in chosen for p in m.parameters(recurse=False)}


def classify(
    model: nn.Module,
    *,
    adamw: str | Iterable[str] = (),
    muon: str | Iterable[str] = (),
    head: str | Sequence[str] | None = "auto",
    split: Mapping[str, SplitSpec] | None = None,
) -> list[ParamPlan]:
    """One ``ParamPlan`` per trainable parameter of ``model``, in ``named_parameters`` order."""
    adamw_pats, muon_pats = _as_patterns(adamw), _as_patterns(muon)
    split = dict(split or {})
    owners: dict[int, list[nn.Module]] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(module)
    heads = _head_params(model, head)

    plans = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mods = owners.get(id(p), [])
        conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in mods)
        view = "flatten" if conv or p.ndim <= 2 else "batch"
        part = next((s for pat, s in split.items() if fnmatch.fnmatchcase(name, pat)), None)
        fused_mha = name.rsplit(".", 1)[-1] == "in_proj_weight" and any(
            isinstance(m, nn.MultiheadAttention) for m in mods
        )
        if part is None and fused_mha:
            part = 3
        if _matches(name, adamw_pats):
            plans.append(ParamPlan(name, p, "adamw", "matches an adamw= pattern"))
        elif _matches(name, muon_pats):
            if p.ndim < 2:
                raise ValueError(f"muon= pattern selects {name!r} of shape {tuple(p.shape)}, but Muon needs 2+ dims")
            plans.append(ParamPlan(name, p, "muon", "matches a muon= pattern", view, part))
        elif p.ndim < 2:
            plans.append(ParamPlan(name, p, "adamw", f"{p.ndim}-D parameter (bias, norm gain or scalar)"))
        elif sum(d > 1 for d in p.shape) <= 1:
            plans.append(ParamPlan(name, p, "adamw", "a vector with singleton dims (e.g. a class token)"))
        elif name.rsplit(".", 1)[-1] in EMBEDDING_NAMES:
            plans.append(ParamPlan(name, p, "adamw", "learned embedding or token (by name)"))
        elif any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) for m in mods):
            tied = " (tied to an output layer)" if len(mods) > 1 else ""
            plans.append(ParamPlan(name, p, "adamw", f"embedding{tied}"))
        elif id(p) in heads:
            plans.append(ParamPlan(name, p, "adamw", "output head"))
        else:
            kind = "conv kernel, flattened" if conv else ("batch of matrices" if p.ndim > 2 else "matrix")
            if fused_mha and part == 3:
                kind = "fused q/k/v of nn.MultiheadAttention, split in 3"
            plans.append(ParamPlan(name, p, "muon", f"hidden {kind}", view, part))
    for pl in plans:  # a split Muon would refuse is refused here (describe and param_groups agree with Muon)
        if pl.algorithm == "muon" and pl.split is not None:
            try:
                matrix_parts(torch.empty(pl.param.shape, device="meta"), pl.matrix_view, pl.split)
            except ValueError as err:
                raise ValueError(f"split for {pl.name!r} of shape {tuple(pl.param.shape)}: {err}") from None
    unused = [pat for pat in split if not any(fnmatch.fnmatchcase(pl.name, pat) for pl in plans)]
    if unused:
        raise ValueError(f"split patterns {unused} match no trainable parameter")
    return plans


def param_groups(
    model: nn.Module,
    *,
    adamw: str | Iterable[str] = (),
    muon: str | Iterable[str] = (),
    head: str | Sequence[str] | None = "auto",
    split: Mapping[str, SplitSpec] | None = None,
    muon_options: Mapping[str, Any] | None = None,
    adamw_options: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups for ``muonkit.Muon`` (see the module docstring for the rules).

    Args:
        model: the model.
        adamw: name patterns that force a parameter to AdamW.
        muon: name patterns that force a parameter to Muon.
        head: ``"auto"`` (default), module names/patterns of the output head, or ``None``.
        split: ``{pattern: split}``: matrices whose row (or column) blocks are orthogonalized separately, e.g.
            ``{"*.qkv.weight": 3}`` (fused Q, K, V) or per head ``{"*.q.weight": 12, "*.o.weight": {"cols": 12}}``
            (``muonkit.optim.parts``).
        muon_options: extra options for the Muon groups (``lr``, ``weight_decay``, ...).
        adamw_options: extra options for the AdamW groups.

    Returns:
        A list of group dicts with ``params``, ``param_names`` and ``algorithm`` (and for Muon groups
        ``matrix_view`` and ``split``); groups with no parameters are left out.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for plan in classify(model, adamw=adamw, muon=muon, head=head, split=split):
        if plan.algorithm == "muon":
            key: tuple = ("muon", plan.matrix_view, split_key(plan.split))
            extra: dict[str, Any] = {
                "matrix_view": plan.matrix_view,
                "split": plan.split,
                **(muon_options or {}),
            }
        else:
            key, extra = ("adamw",), dict(adamw_options or {})
        group = groups.setdefault(key, {"params": [], "param_names": [], "algorithm": plan.algorithm, **extra})
        group["params"].append(plan.param)
        group["param_names"].append(plan.name)
    return list(groups.values())


def describe(model: nn.Module, **classify_options: Any) -> str:
    """A table of every trainable parameter: name, shape, algorithm, and why (``classify``'s decisions)."""
    plans = classify(model, **classify_options)
    rows = [
        (
            pl.name,
            "x".join(map(str, pl.param.shape)) or "scalar",
            pl.algorithm + (f" (split {pl.split})" if pl.split else ""),
            pl.reason,
        )
        for pl in plans
    ]
    header = ("parameter", "shape", "algorithm", "why")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    counts = {a: sum(pl.param.numel() for pl in plans if pl.algorithm == a) for a in ("muon", "adamw")}
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]
    lines = [line.rstrip() for line in lines]
    lines.append(f"muon: {counts['muon']:,} parameters; adamw: {counts['adamw']:,} parameters")
    return "\n".join(lines)
