"""Eager NS calls on CUDA replay cached CUDA graphs: the cache's bounds on CPU, the replayed results on a GPU."""

import pytest
import torch

import muonkit
from muonkit.accel import cuda_graphs, kernels
from muonkit.accel.cuda_graphs import GraphCache, Graphed
from muonkit.optim import plans

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _Replay:
    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


def _entry(nbytes, out=None):
    return Graphed(input=torch.zeros(2), output=torch.zeros(2) if out is None else out, graph=_Replay(), nbytes=nbytes)


@pytest.fixture(autouse=True)
def _restore():
    enabled, bound, mode = cuda_graphs.cuda_graphs_enabled(), cuda_graphs.cache.max_bytes, kernels.get_mode()
    cuda_graphs.cache.clear()
    yield
    cuda_graphs.set_cuda_graphs(enabled, bound)
    kernels.set_mode(mode)
    cuda_graphs.cache.clear()


def test_cache_builds_once_and_drops_least_recently_used_past_its_bound():
    cache = GraphCache(max_bytes=100)
    built = []

    def build(name, nbytes):
        def make():
            built.append(name)
            return _entry(nbytes)

        return make

    a = cache.get("a", 40, build("a", 40))
    assert cache.get("a", 40, build("a", 40)) is a and built == ["a"]
    cache.get("b", 40, build("b", 40))
    cache.get("a", 40, build("a", 40))  # a is now the most recently used
    cache.get("c", 40, build("c", 40))  # 120 > 100: b goes, not a
    assert built == ["a", "b", "c"] and len(cache) == 2 and cache.nbytes == 80
    assert cache.get("a", 40, build("a", 40)) is a
    cache.get("b", 40, build("b", 40))
    assert built[-1] == "b"  # rebuilt after it was dropped


def test_graphs_that_do_not_fit_together_stop_taking_turns():
    """Two graphs that each fit but not together, asked for in turn (two NS batches of one step): each is
    dropped for the other at most twice, then the one dropped twice runs eagerly and the other stays."""
    cache = GraphCache(max_bytes=100)
    built = []

    def build(name):
        return lambda: built.append(name) or _entry(60)

    for _ in range(6):
        for name in ("a", "b"):
            cache.get(name, 60, build(name))
    assert built == ["a", "b", "a", "b"]  # a was dropped twice (for b): no third capture of a
    assert cache.get("b", 60, build("b")) is not None and cache.get("a", 60, build("a")) is None
    assert cache.failed("a") and not cache.failed("b") and len(built) == 4


def test_cache_runs_eagerly_what_does_not_fit_or_failed_to_capture():
    cache = GraphCache(max_bytes=100)
    calls = []

    def too_big():
        calls.append("big")
        return _entry(500)

    def failing():
        calls.append("fail")
        raise RuntimeError("operation not permitted when stream is capturing")

    assert cache.get("big", 500, too_big) is None and calls == []  # estimate alone exceeds the bound
    assert cache.get("f", 10, failing) is None
    assert cache.get("f", 10, failing) is None and calls == ["fail"]  # not retried
    assert cache.get("under", 10, too_big) is None  # estimated small, measured too big: not kept
    assert len(cache) == 0


def test_graphed_entry_copies_input_and_replays():
    out = torch.zeros(2)
    e = _entry(8, out)
    x = torch.tensor([1.0, 2.0])
    assert e.run(x) is out and torch.equal(e.input, x) and e.graph.replays == 1


def test_switch_and_bound_are_validated_and_turning_off_clears():
    cuda_graphs.cache._entries["k"] = _entry(8)
    with pytest.raises(ValueError, match="max_bytes"):
        cuda_graphs.set_cuda_graphs(True, max_bytes=-1)
    cuda_graphs.set_cuda_graphs(True, max_bytes=4)  # below the entry's size: dropped
    assert len(cuda_graphs.cache) == 0
    cuda_graphs.cache._entries["k"] = _entry(2)
    cuda_graphs.set_cuda_graphs(False)
    assert len(cuda_graphs.cache) == 0 and not cuda_graphs.cuda_graphs_enabled()


def test_cpu_calls_never_touch_the_cache():
    G = torch.randn(4, 32, 48)
    assert not cuda_graphs.graphable(G)
    muonkit.orthogonalize(G)
    assert len(cuda_graphs.cache) == 0


@cuda
def test_replayed_graph_equals_eager_with_the_same_kernels():
    kernels.set_mode("torch")  # same kernels eagerly and in the graph: identical results expected
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(6, 256, 384, device="cuda", generator=gen) for _ in range(3)]
    cuda_graphs.set_cuda_graphs(False)
    want = [muonkit.orthogonalize(G) for G in inputs]
    cuda_graphs.set_cuda_graphs(True)
    got = [muonkit.orthogonalize(G) for G in inputs]  # first call captures, the others replay
    assert len(cuda_graphs.cache) == 1
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert len({g.data_ptr() for g in got}) == 3  # each result is its own tensor


@cuda
def test_half_input_results_are_not_the_static_buffer():
    G1, G2 = (torch.randn(4, 512, 512, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    O1 = muonkit.orthogonalize(G1)
    keep = O1.clone()
    muonkit.orthogonalize(G1)  # captured by now; replay must not write into O1
    muonkit.orthogonalize(G2)
    assert torch.equal(O1, keep)
    ref = muonkit.orthogonalize(G2.double()).float()
    assert (muonkit.orthogonalize(G2).float() - ref).norm() / ref.norm() < 0.05


@cuda
def test_auto_kernel_choice_in_graphs_stays_accurate():
    kernels.set_mode("auto")  # the graph may take the Triton kernel where eager calls would not
    G = torch.randn(8, 768, 1024, device="cuda")
    ref = muonkit.orthogonalize(G.double())
    for _ in range(3):
        O = muonkit.orthogonalize(G)
        assert (O.double() - ref).norm() / ref.norm() < 0.03


@cuda
def test_streams_get_their_own_graphs_and_autograd_inputs_none():
    G = torch.randn(2, 128, 256, device="cuda")
    muonkit.orthogonalize(G)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        muonkit.orthogonalize(G)
    torch.cuda.current_stream().wait_stream(side)
    assert len(cuda_graphs.cache) == 2
    muonkit.orthogonalize(torch.randn(3, 64, 64, device="cuda", requires_grad=True))
    assert len(cuda_graphs.cache) == 2


@cuda
def test_optimizer_step_with_graphs_equals_eager():
    kernels.set_mode("torch")

    def run(graphs):
        cuda_graphs.set_cuda_graphs(graphs)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(64, 96), (64, 96), (96, 64), (32, 32)]]
        opt = muonkit.Muon(params, lr=0.02, weight_decay=0.01)
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(t * 10 + i))
            opt.step()
        return [p.detach().clone() for p in params]

    eager, graphed = run(False), run(True)
    assert len(cuda_graphs.cache) >= 2
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _EffectGraph:
    """A stand-in for a captured side-effecting sequence: replaying runs it again on the static scalars."""

    def __init__(self, fn, scalars):
        self.fn, self.scalars, self.replays = fn, scalars, 0

    def replay(self):
        self.replays += 1
        self.fn(self.scalars)


def test_replays_capture_once_addresses_repeat_and_read_new_scalars(monkeypatch):
    """Eager until a slot's addresses come back, then captured and replayed with each call's scalars; new addresses
    run eagerly again; a slot that keeps moving stops being captured after max_captures; two sets of addresses
    that alternate are captured one graph each."""
    captured = []

    def fake_capture(fn, n, device, pools=None):
        scalars = torch.zeros(n)
        entry = Graphed(scalars, scalars, _EffectGraph(fn, scalars), nbytes=0)
        captured.append(entry)
        return entry

    monkeypatch.setattr(cuda_graphs, "_capture_effect", fake_capture)
    replays = cuda_graphs.Replays(max_captures=2)
    seen = []

    def run(addresses, value, slot="s"):
        replays.run(slot, addresses, [value, -value], lambda s: seen.append(s.tolist()), torch.device("cpu"), 0,
                    replaces="ns graph")  # fmt: skip

    cuda_graphs.cache.get("ns graph", 0, lambda: _entry(1))
    run("A", 1.0)  # eager
    assert seen == [[1.0, -1.0]] and not captured and cuda_graphs.cache.peek("ns graph") is not None
    run("A", 2.0)  # same addresses again: captured (the graph it replaces dropped), replayed with this call's values
    assert cuda_graphs.cache.peek("ns graph") is None
    run("A", 3.0)  # replayed
    assert len(captured) == 1 and captured[0].graph.replays == 2
    assert seen[1:] == [[2.0, -2.0], [3.0, -3.0]]
    captured[0].input.fill_(0.5)  # unchanged values are not copied again: the input keeps what it holds
    run("A", 3.0)
    assert seen[-1] == [0.5, 0.5] and captured[0].values == [3.0, -3.0]
    captured[0].input.copy_(torch.tensor([3.0, -3.0]))
    captured[0].graph.replays -= 1
    del seen[-1]
    run("B", 4.0)  # moved: eager, no capture
    assert len(captured) == 1 and captured[0].graph.replays == 2 and seen[-1] == [4.0, -4.0]
    run("B", 5.0)  # repeated: the slot's second capture
    run("A", 6.0)  # A's graph is still cached: replayed
    assert len(captured) == 2 and captured[0].graph.replays == 3 and seen[-1] == [6.0, -6.0]
    run("C", 7.0)
    run("C", 8.0)  # would be a third capture of slot "s": over max_captures, eager
    assert len(captured) == 2 and seen[-2:] == [[7.0, -7.0], [8.0, -8.0]]
    run("C", 9.0, slot="t")  # another slot has its own count
    run("C", 9.5, slot="t")
    assert len(captured) == 3

    def failing(fn, n, device, pools=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graphs, "_capture_effect", failing)
    cuda_graphs.cache.get("ns graph", 0, lambda: _entry(1))
    run("D", 10.0, slot="u")
    run("D", 11.0, slot="u")  # the capture fails: eager, remembered
    cuda_graphs.cache.get("ns graph", 0, lambda: _entry(1))  # the eager run's NS graph, cached again
    run("D", 12.0, slot="u")  # not tried again, so that graph is left alone
    assert seen[-3:] == [[10.0, -10.0], [11.0, -11.0], [12.0, -12.0]]
    assert replays._captures["u"] == 1 and cuda_graphs.cache.peek("ns graph") is not None

    monkeypatch.setattr(cuda_graphs, "_capture_effect", fake_capture)
    for addresses in ("E", "F", "E", "F", "E", "F"):  # two optimizers of one structure, stepped in turns
        run(addresses, 13.0, slot="v")
    assert len(captured) == 5 and [c.graph.replays for c in captured[3:]] == [2, 2]


@cuda
@pytest.mark.parametrize("method,ns_dtype", [("newton_schulz", torch.bfloat16), ("gram", torch.float16)])
def test_whole_batch_replays_follow_schedules_and_moved_gradients(method, ns_dtype):
    """The fused step's whole-batch graphs: lr, weight decay and momentum change every step (read from device
    memory), gradients stay in place for some steps and are reallocated for others; every step equals the
    same step with graphs off, and graphs were replayed."""
    kernels.set_mode("triton")  # the symmetric-product kernel eagerly and captured alike (same kernels both ways)

    def run(graphs):
        cuda_graphs.set_cuda_graphs(graphs)
        cuda_graphs.cache.clear()
        torch.manual_seed(0)
        shapes = [(96, 32), (32, 96), (96, 32), (32, 32), (3 * 32, 32)]
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        groups = [dict(params=params[:4], weight_decay=0.01), dict(params=params[4:], split=3, momentum=0.9)]
        opt = muonkit.Muon(groups, lr=0.02, method=method, ns_dtype=ns_dtype)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
        replays = 0
        for t in range(8):
            for g in opt.param_groups:
                g["momentum"] = min(0.95, 0.85 + 0.02 * t)
            for i, p in enumerate(params):
                new = torch.randn(p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(t * 10 + i))
                if p.grad is None or t in (5,):  # step 5: gradients reallocated (elsewhere: a new slot)
                    p.grad = new.clone()
                else:
                    p.grad.copy_(new)
            opt.step()
            sched.step()
            replays += sum(isinstance(k, tuple) and k[0] == "replay" for k in cuda_graphs.cache._entries)
        return [p.detach().clone() for p in params], replays

    (eager, _), (graphed, replays) = run(False), run(True)
    assert replays > 0
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@cuda
def test_whole_batch_graphs_replay_on_gradients_reallocated_every_step():
    """A loop that frees its gradients every step (``zero_grad(set_to_none=True)``) gets them at new addresses;
    the captured graphs read the gradients' addresses from device memory, so each batch is captured once and
    replayed from then on (not run eagerly for want of a repeated address), and every step equals the eager
    one to the bit."""
    kernels.set_mode("triton")

    def run(graphs):
        cuda_graphs.set_cuda_graphs(graphs)
        cuda_graphs.cache.clear()
        cuda_graphs.replays.clear()
        torch.manual_seed(0)
        shapes = [(96, 32), (32, 96), (64, 64), (3 * 32, 32)]
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        opt = muonkit.Muon([dict(params=params[:3]), dict(params=params[3:], split=3)], lr=0.02, weight_decay=0.01)
        held = []
        for t in range(6):
            opt.zero_grad(set_to_none=True)
            for i, p in enumerate(params):
                gen = torch.Generator("cuda").manual_seed(10 * t + i)
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            held.append([p.grad for p in params])  # kept alive: each step's gradients lie elsewhere
            opt.step()
        assert len({tuple(g.data_ptr() for g in gs) for gs in held}) == len(held)
        captures = sum(cuda_graphs.replays._captures.values())
        graphs = sum(isinstance(k, tuple) and k[0] == "replay" for k in cuda_graphs.cache._entries)
        return [p.detach().clone() for p in params], captures, graphs

    (eager, _, _), (graphed, captures, graphs) = run(False), run(True)
    assert graphs > 0 and captures == graphs  # one capture per batch, never again
    for a, b in zip(eager, graphed):
        assert torch.equal(a, b)


@cuda
def test_gradient_tables_are_rewritten_only_where_gradients_moved(monkeypatch):
    """A plan's gradient tables are written again only where the gradients' addresses differ from those they hold:
    not on steps whose gradients stayed in place, but on every step of two optimizers of one structure (one plan,
    one table per batch) stepped in turns, each over its own gradients; each optimizer's steps equal its steps
    alone with graphs off, to the bit."""
    kernels.set_mode("triton")
    writes = []
    real = plans._grad_table
    monkeypatch.setattr(plans, "_grad_table", lambda batch, calls: writes.append(batch) or real(batch, calls))

    def make(seed):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(96, 32), (32, 96), (64, 64)]]
        return params, muonkit.Muon(params, lr=0.02, weight_decay=0.01)

    def grads(params, t, seed):
        for i, p in enumerate(params):
            new = torch.randn(
                p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(100 * seed + t * 10 + i)
            )
            p.grad = new if p.grad is None else p.grad.copy_(new)  # in place: the same addresses every step

    def run(graphs, turns):
        cuda_graphs.set_cuda_graphs(graphs)
        cuda_graphs.cache.clear()
        cuda_graphs.replays.clear()
        both = [make(0), make(1)]
        counts = []
        for t in range(6):
            for k, (params, opt) in enumerate(both if turns else both[:1]):
                grads(params, t, k)
                before = len(writes)
                opt.step()
                counts.append(len(writes) - before)
        return [[p.detach().clone() for p in params] for params, _ in both], counts

    (alone_eager, _), (alone, counts) = run(False, False), run(True, False)
    assert sum(counts[:3]) > 0 and counts[3:] == [0, 0, 0]  # once captured, nothing rewritten: nothing moved
    for a, b in zip(alone_eager[0], alone[0]):
        assert torch.equal(a, b)
    (turns_eager, _), (turns, counts) = run(False, True), run(True, True)
    assert all(c > 0 for c in counts[4:])  # each step finds the other optimizer's gradients in the tables
    for eager_params, graphed_params in zip(turns_eager, turns):
        for a, b in zip(eager_params, graphed_params):
            assert torch.equal(a, b)


@cuda
def test_whole_batch_graphs_share_one_memory_pool():
    """Two batches of the fused step captured one after the other: the second reuses the first's scratch memory
    (one pool per stream), so the graphs together hold about the larger batch's intermediates, not their sum;
    and the steps still equal the eager ones to the bit."""
    kernels.set_mode("triton")

    def run(graphs):
        cuda_graphs.set_cuda_graphs(graphs)
        cuda_graphs.cache.clear()
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(256, 1024)] * 4 + [(192, 768)] * 4]
        opt = muonkit.Muon(params, lr=0.02, method="newton_schulz", ns_dtype=torch.bfloat16)
        for t in range(4):
            for i, p in enumerate(params):  # gradients kept in place: the batches are captured from step 2
                new = torch.randn(p.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(t * 10 + i))
                p.grad = new if p.grad is None else p.grad.copy_(new)
            opt.step()
        sizes = [  # the batches' graphs (not the gradient check's, which allocates nothing)
            e.nbytes for k, e in cuda_graphs.cache._entries.items()
            if isinstance(k, tuple) and k[0] == "replay" and k[1][0] != "finite_scan"
        ]  # fmt: skip
        return [p.detach().clone() for p in params], sizes

    (eager, _), (graphed, sizes) = run(False), run(True)
    assert len(sizes) == 2, sizes
    assert sum(sizes) < 1.25 * max(sizes), sizes  # with a private pool each: about the two together
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@cuda
def test_stream_key_follows_stream_switches():
    """A graph is bound to the stream it was captured for: ``cuda_graphs.stream_key`` tells the current stream
    apart inside and outside ``torch.cuda.stream`` blocks."""
    dev = torch.device("cuda", torch.cuda.current_device())
    side = torch.cuda.Stream(dev)
    first = torch.cuda.current_stream(dev)
    with torch.cuda.stream(side):
        assert cuda_graphs.stream_key(dev) == (side.device_index, side.stream_id)
        assert cuda_graphs.stream_key(torch.device("cuda")) == (side.device_index, side.stream_id)  # no index
    assert cuda_graphs.stream_key(dev) == (first.device_index, first.stream_id) != (side.device_index, side.stream_id)
