import pytest
import torch
from torch import nn

import muonkit
from muonkit import Muon, classify, describe, param_groups


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)


class GPTish(nn.Module):
    def __init__(self, vocab=64, d=16, tie=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(32, d)
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight


def _plan(model, **kw):
    return {pl.name: pl for pl in classify(model, **kw)}


@pytest.mark.parametrize("tie", [True, False])
def test_transformer_classification(tie):
    plans = _plan(GPTish(tie=tie))
    assert plans["wte.weight"].algorithm == "adamw" and plans["wpe.weight"].algorithm == "adamw"
    if tie:
        assert "lm_head.weight" not in plans  # shared with wte, listed once
        assert "tied" in plans["wte.weight"].reason
    else:
        assert plans["lm_head.weight"].algorithm == "adamw" and plans["lm_head.weight"].reason == "output head"
    for i in range(2):
        for mod in ("qkv", "proj", "fc", "out"):
            assert plans[f"blocks.{i}.{mod}.weight"].algorithm == "muon"
        assert plans[f"blocks.{i}.ln.weight"].algorithm == "adamw"
        assert plans[f"blocks.{i}.proj.bias"].algorithm == "adamw"


def test_head_found_by_vocab_size_when_unnamed():
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 50), nn.Tanh(), nn.Linear(50, 50))
    plans = _plan(model)
    # two Linears map to the vocabulary size; only the last registered one is the head
    assert plans["1.weight"].algorithm == "muon"
    assert plans["3.weight"].algorithm == "adamw" and plans["3.weight"].reason == "output head"


def test_cnn_classifier_head_and_conv_view():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4, 10))
    plans = _plan(model)
    assert plans["0.weight"].algorithm == "muon" and plans["0.weight"].matrix_view == "flatten"
    assert plans["2.weight"].algorithm == "muon"
    assert plans["4.weight"].algorithm == "adamw" and plans["4.weight"].reason == "output head"


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts_in = nn.Parameter(torch.randn(4, 8, 16))
        self.experts_out = nn.Parameter(torch.randn(4, 16, 8))
        self.router = nn.Linear(8, 4)
        self.frozen = nn.Parameter(torch.randn(8, 8), requires_grad=False)


def test_expert_stacks_are_batches_and_frozen_params_left_out():
    plans = _plan(MoE(), head=None)
    assert plans["experts_in"].algorithm == "muon" and plans["experts_in"].matrix_view == "batch"
    assert plans["router.weight"].algorithm == "muon"
    assert "frozen" not in plans


def test_patterns_head_option_and_split():
    model = GPTish(tie=False)
    plans = _plan(model, adamw="blocks.1.*", muon=["lm_head.weight"], split={"*.qkv.weight": 3})
    assert plans["blocks.1.fc.weight"].algorithm == "adamw"
    assert plans["lm_head.weight"].algorithm == "muon"
    assert plans["blocks.0.qkv.weight"].split == 3
    plans = _plan(model, head="blocks.1.out")
    assert plans["blocks.1.out.weight"].reason == "output head"
    assert plans["lm_head.weight"].algorithm == "muon"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"muon": "*.ln.weight"}, "needs 2\\+ dims"),
        ({"head": "nothing_here"}, "matches no module"),
        ({"split": {"*.nothing": 3}}, "match no trainable"),
    ],
)
def test_bad_grouping_options(kw, match):
    with pytest.raises(ValueError, match=match):
        classify(GPTish(), **kw)


def test_groups_feed_muon_and_cover_every_trainable_parameter():
    model = GPTish(tie=False)
    groups = param_groups(model, split={"*.qkv.weight": 3}, adamw_options={"lr": 1e-3})
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    algos = {(g["algorithm"], g.get("split")) for g in groups}
    assert algos == {("adamw", None), ("muon", None), ("muon", 3)}
    assert all(len(g["params"]) == len(g["param_names"]) for g in groups)
    opt = Muon(groups)
    assert [g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"] == [1e-3]
    idx = torch.randint(0, 64, (2, 5))
    h = model.wte(idx)
    for blk in model.blocks:
        h = h + blk.out(torch.relu(blk.fc(blk.ln(h)))) + blk.proj(blk.qkv(h)[..., :16])
    model.lm_head(model.ln_f(h)).logsumexp(-1).mean().backward()
    opt.step()
    assert all(p in opt.state for g in groups for p in g["params"] if p.grad is not None)


def test_per_head_splits_group_equal_splits_however_written():
    """Per-head Q/K/V rows and output-projection columns (``{"cols": heads}``): the blocks' projections share a
    group when their splits are equal, whether written with lists or tuples."""
    model = GPTish(tie=False)
    split = {"blocks.0.proj.weight": {"cols": [8, 8]}, "blocks.1.proj.weight": {"cols": (8, 8)}, "*.qkv.weight": 6}
    groups = param_groups(model, split=split)
    by_names = {tuple(g["param_names"]): g for g in groups}
    proj = by_names[("blocks.0.proj.weight", "blocks.1.proj.weight")]
    assert proj["split"] == {"cols": [8, 8]} and by_names[("blocks.0.qkv.weight", "blocks.1.qkv.weight")]["split"] == 6
    assert "split {'cols': [8, 8]}" in describe(model, split=split)
    opt = Muon(groups)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[model.blocks[0].proj.weight]["momentum_buffer"].shape == (16, 16)


def test_public_api():
    for name in ("Muon", "orthogonalize", "param_groups", "classify", "coefficients", "polar_svd"):
        assert hasattr(muonkit, name)


def test_describe_lists_every_parameter_with_its_reason():
    model = GPTish(tie=False)
    text = muonkit.describe(model, split={"*.qkv.weight": 3})
    for name, _ in model.named_parameters():
        assert name in text
    assert "output head" in text and "split 3" in text and "embedding" in text
    total = sum(p.numel() for p in model.parameters())
    muon = sum(p.numel() for pl in muonkit.classify(model) if pl.algorithm == "muon" for p in [pl.param])
    assert f"muon: {muon:,} parameters; adamw: {total - muon:,} parameters" in text


class ViTLike(nn.Module):
    """Patch embedding, class token, positional embedding, a torch encoder layer, norm and classifier head."""

    def __init__(self, d=16, patches=4, classes=5):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 2, stride=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, d))
        self.block = nn.TransformerEncoderLayer(d, 2, 32, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)


GROUPING_CASES = [  # (model, {parameter: (algorithm, split or None, a word of the reason)})
    (
        nn.TransformerEncoderLayer(16, 2, 32),  # a block alone: ends in norms, so it has no head
        {"self_attn.in_proj_weight": ("muon", 3, "q/k/v"), "self_attn.out_proj.weight": ("muon", None, "matrix"),
         "linear1.weight": ("muon", None, "matrix"), "linear2.weight": ("muon", None, "matrix"),
         "norm1.weight": ("adamw", None, "1-D")},
    ),
    (
        nn.MultiheadAttention(16, 4),  # its out_proj is the last module with parameters, and still no head
        {"in_proj_weight": ("muon", 3, "q/k/v"), "out_proj.weight": ("muon", None, "matrix")},
    ),
    (
        ViTLike(),
        {"cls_token": ("adamw", None, "token"), "pos_embed": ("adamw", None, "embedding"),
         "patch_embed.weight": ("muon", None, "conv"), "block.self_attn.in_proj_weight": ("muon", 3, "q/k/v"),
         "head.weight": ("adamw", None, "head")},
    ),
    (
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        {"0.weight": ("muon", None, "conv"), "2.weight": ("adamw", None, "head")},  # a 1x1-conv classifier
    ),
    (
        nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8), nn.LayerNorm(8)),  # an FFN, not a classifier
        {"0.weight": ("muon", None, "matrix"), "2.weight": ("muon", None, "matrix")},
    ),
]  # fmt: skip


@pytest.mark.parametrize("model,want", GROUPING_CASES, ids=["encoder-layer", "mha", "vit", "1x1-conv", "ffn"])
def test_common_architectures_are_grouped_as_their_users_expect(model, want):
    plans = _plan(model)
    for name, (algorithm, split, word) in want.items():
        plan = plans[name]
        assert (plan.algorithm, plan.split) == (algorithm, split), (name, plan)
        assert word in plan.reason, (name, plan.reason)
    Muon(param_groups(model))  # and Muon takes the groups as they are


@pytest.mark.parametrize("split", [5, [10, 10], [0, 48]])
def test_a_split_muon_refuses_is_refused_by_classify_describe_and_param_groups(split):
    model = nn.Sequential(nn.Linear(8, 48, bias=False), nn.Linear(48, 8))
    for call in (classify, describe, param_groups):
        with pytest.raises(ValueError, match="split"):
            call(model, split={"0.weight": split})
