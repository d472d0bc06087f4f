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


W = torch.zeros(12, 4)
DEGENERATE = [  # (what, call on a fresh QKClip, error text)
    ("tau infinite", lambda c: muonkit.QKClip(tau=float("inf")), "tau"),
    ("tau NaN", lambda c: muonkit.QKClip(tau=float("nan")), "tau"),
    ("tau a string", lambda c: muonkit.QKClip(tau="100"), "tau"),
    ("alpha NaN", lambda c: muonkit.QKClip(alpha=float("nan")), "alpha"),
    ("alpha above 1", lambda c: muonkit.QKClip(alpha=1.5), "alpha"),
    ("unknown nonfinite policy", lambda c: muonkit.QKClip(nonfinite="ignore"), "nonfinite"),
    ("zero heads", lambda c: c.register("a", W, W, heads=0), "multiple"),
    ("float heads", lambda c: c.register("a", W, W, heads=3.0), "ints"),
    ("bool heads", lambda c: c.register("a", W, W, heads=True), "ints"),
    ("1-D query weight", lambda c: c.register("a", torch.zeros(12), W, heads=3), "query weight"),
    ("bias of the wrong length", lambda c: c.register("a", W, W, heads=3, q_bias=torch.zeros(5)), "query bias"),
    ("2-D bias", lambda c: c.register("a", W, W, heads=3, k_bias=torch.zeros(12, 1)), "key bias"),
    ("a name registered twice", lambda c: (c.register("a", W, W, heads=3), c.register("a", W, W, heads=3)), "already"),
]


@pytest.mark.parametrize("call,message", [d[1:] for d in DEGENERATE], ids=[d[0] for d in DEGENERATE])
def test_degenerate_arguments_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(muonkit.QKClip())


def _two_layers(nonfinite):
    torch.manual_seed(0)
    clip = muonkit.QKClip(tau=10.0, nonfinite=nonfinite)
    weights = {n: (torch.randn(8, 4), torch.randn(8, 4)) for n in ("a", "b")}
    for n, (q, k) in weights.items():
        clip.register(n, q, k, heads=2)
    return clip, weights


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), float("-inf")])
def test_non_finite_logits_never_rewrite_weights_and_are_counted(bad):
    clip, weights = _two_layers("skip")
    before = {n: (q.clone(), k.clone()) for n, (q, k) in weights.items()}
    clip.observe_max("a", torch.tensor([bad, 40.0]))  # head 0 non-finite, head 1 over tau
    clip.observe_max("b", torch.tensor([20.0, 5.0]))
    clip.apply()
    q, k = weights["a"]
    assert torch.equal(q[:4], before["a"][0][:4]) and torch.equal(k[:4], before["a"][1][:4])  # skipped head
    assert torch.allclose(q[4:], before["a"][0][4:] * 0.5) and torch.allclose(k[4:], before["a"][1][4:] * 0.5)
    assert torch.allclose(weights["b"][0][:4], before["b"][0][:4] * 0.5**0.5)  # other layers clip as ever
    assert clip.nonfinite_heads == 1
    clip.observe_max("a", torch.tensor([float("nan"), float("nan")]))
    clip.apply()
    assert clip.nonfinite_heads == 3


def test_non_finite_logits_raise_before_any_weight_changes_with_raise():
    clip, weights = _two_layers("raise")
    before = {n: (q.clone(), k.clone()) for n, (q, k) in weights.items()}
    clip.observe_max("a", torch.tensor([50.0, 50.0]))  # would be clipped, but another layer is bad
    clip.observe_max("b", torch.tensor([1.0, float("inf")]))
    with pytest.raises(FloatingPointError, match=r"b \(heads \[1\]\)"):
        clip.apply()
    for n, (q, k) in weights.items():
        assert torch.equal(q, before[n][0]) and torch.equal(k, before[n][1])
    clip.observe_max("a", torch.tensor([50.0, 50.0]))  # the observations were dropped: the next apply is clean
    clip.apply()
    assert torch.allclose(weights["a"][0], before["a"][0] * (10 / 50) ** 0.5)
