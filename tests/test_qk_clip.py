"""QK-clip: after apply(), every head's largest logit on the observed batch is at most tau."""

import pytest
import torch
from torch import nn

import muonkit
from muonkit.qk_clip import max_logits

D_IN, HEADS, HEAD_DIM = 16, 4, 8


class ToyAttention(nn.Module):
    """Separate q/k/v projections (optionally grouped-query), logits reported to a QKClip."""

    def __init__(self, kv_heads=HEADS, bias=False):
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(D_IN, HEADS * HEAD_DIM, bias=bias)
        self.k = nn.Linear(D_IN, kv_heads * HEAD_DIM, bias=bias)
        self.v = nn.Linear(D_IN, kv_heads * HEAD_DIM, bias=bias)
        self.clip = None

    def qk(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        return q, k

    def forward(self, x):
        q, k = self.qk(x)
        if self.clip is not None:
            self.clip.observe("attn", q, k, causal=True)
        b, t, _ = x.shape
        v = self.v(x).view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2)
        rep = HEADS // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _x(seed=0):
    return torch.randn(3, 10, D_IN, generator=torch.Generator().manual_seed(seed))


def test_max_logits_matches_brute_force_with_causal_mask_and_gqa():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 5, 3, generator=gen), torch.randn(2, 2, 5, 3, generator=gen)
    got = max_logits(q, k, scale=0.5, causal=True)
    for h in range(4):
        best = max(0.5 * float(q[b, h, i] @ k[b, h // 2, j]) for b in range(2) for i in range(5) for j in range(i + 1))
        assert got[h].item() == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("kv_heads,bias", [(HEADS, False), (2, True)])
def test_apply_brings_every_head_to_at_most_tau_and_leaves_quiet_heads(kv_heads, bias):
    torch.manual_seed(0)
    layer = ToyAttention(kv_heads, bias)
    with torch.no_grad():  # make heads 0 and 3 loud
        layer.q.weight[:HEAD_DIM] *= 12
        layer.q.weight[3 * HEAD_DIM :] *= 6
    x = _x()
    with torch.no_grad():
        before = max_logits(*layer.qk(x), causal=True)
    tau = float(before.detach().sort().values[1]) * 1.01  # the two loudest heads exceed tau, the others do not
    clip = muonkit.QKClip(tau=tau)
    clip.register(
        "attn",
        layer.q.weight,
        layer.k.weight,
        HEADS,
        kv_heads,
        layer.q.bias if bias else None,
        layer.k.bias if bias else None,
    )
    layer.clip = clip
    untouched = [h for h in range(HEADS) if before[h] <= tau]
    q_before = layer.q.weight.detach().clone()
    layer(x)
    gammas = clip.apply()["attn"]
    after = max_logits(*layer.qk(x), causal=True)
    assert (after <= tau * (1 + 1e-5)).all()
    assert (gammas < 1).sum() == HEADS - len(untouched)
    for h in untouched:  # a quiet head's query rows are unchanged
        rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        assert torch.equal(layer.q.weight[rows], q_before[rows])
    if kv_heads == HEADS:  # without shared keys the clipped heads land exactly on tau
        loud = [h for h in range(HEADS) if before[h] > tau]
        assert torch.allclose(after[loud], torch.full((len(loud),), tau), rtol=1e-4)
    assert clip.apply() == {}  # observations are consumed


def test_fused_qkv_of_the_demo_gpt():
    from muonkit.train import GPT, SIZES

    torch.manual_seed(0)
    cfg = SIZES["tiny"]
    model = GPT(cfg)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight[: 2 * cfg.d_model] *= 20  # queries and keys
    clip = muonkit.QKClip(tau=5.0)
    clip.register_fused("block0", attn.qkv.weight, cfg.n_head)
    x = torch.randn(2, 7, cfg.d_model)
    d = cfg.d_model // cfg.n_head

    def logits():
        q, k, _ = attn.qkv(x).split(cfg.d_model, dim=-1)
        q = q.view(2, 7, cfg.n_head, d).transpose(1, 2)
        k = k.view(2, 7, cfg.n_head, d).transpose(1, 2)
        return q, k

    assert max_logits(*logits()).max() > 5.0
    clip.observe("block0", *logits())
    clip.apply()
    assert max_logits(*logits()).max() <= 5.0 * (1 + 1e-5)


def test_training_with_clip_keeps_logits_bounded():
    """A loss that rewards large logits: without the clip they run away, with it they stay near tau."""

    def run(tau):
        torch.manual_seed(0)
        layer = ToyAttention()
        opt = muonkit.Muon([layer.q.weight, layer.k.weight], lr=0.05, ns_dtype=torch.float32)
        clip = None
        if tau is not None:
            clip = muonkit.QKClip(tau=tau)
            clip.register("attn", layer.q.weight, layer.k.weight, HEADS)
        for step in range(40):
            x = _x(step)
            q, k = layer.qk(x)
            loss = -(q @ k.transpose(-1, -2)).mean()
            opt.zero_grad()
            loss.backward()
            if clip is not None:
                clip.observe("attn", q, k)
            opt.step()
            if clip is not None:
                clip.apply()
        return float(max_logits(*layer.qk(_x(99))).max())

    free, clipped = run(None), run(4.0)
    assert free > 12.0
    assert clipped < 4.0 * 1.5


def test_bad_registrations_are_refused():
    clip = muonkit.QKClip()
    w = torch.zeros(12, 4)
    with pytest.raises(ValueError, match="split"):
        clip.register("a", w, w, heads=5)
    with pytest.raises(ValueError, match="multiple"):
        clip.register("a", w, w, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="q/k/v"):
        clip.register_fused("a", torch.zeros(10, 4), heads=2)
    with pytest.raises(KeyError, match="registered"):
        clip.observe_max("nope", torch.zeros(2))
    with pytest.raises(ValueError, match="tau"):
        muonkit.QKClip(tau=0)
    clip.register("a", w, w, heads=3)
    with pytest.raises(ValueError, match="per-head"):
        clip.observe_max("a", torch.zeros(4))
