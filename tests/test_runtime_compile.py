"""dfqkern.compile: the captured graph computes what the eager packed model computes, follows weight writes,
and says clearly (or falls back) when it cannot capture or compile."""
import pytest
import torch
from torch import nn

import dfqkern
from dfqkern import QuantConfig, calibrate_activations, pack_model, quantize_model
from dfqkern.model_info import model_info, set_info
from dfqkern.nn.base import QuantLayer


class TinyResNet(nn.Module):
    """conv-BN-ReLU, a residual block, pooling and a linear head: the glue dfqkern.compile rewrites."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.relu2(x + y), 1), 1))


def _packed(seed=0):
    torch.manual_seed(seed)
    m = TinyResNet().eval()
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(8, 3, 8, 8), progress=False)
    return pack_model(q).eval()


def _x(n=2):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["graph", "frozen"])
def test_graph_logits_equal_eager_packed_logits(mode):
    q = _packed()
    set_info(q, arch="tiny")
    c = dfqkern.compile(q, mode=mode, example_inputs=_x())
    assert isinstance(c, dfqkern.runtime_compile.CompiledModel)
    gm = c._run.__self__
    # every packed layer is called directly and every folded BatchNorm (nn.Identity) is gone
    assert not [n for n in gm.graph.nodes if n.op == "call_module"], gm.code
    with torch.no_grad():
        for n in (1, 3):
            assert torch.equal(c(_x(n)), q(_x(n)))
    assert model_info(c).arch == "tiny"


def test_graph_follows_weights_written_after_compile():
    q, other = _packed(0), _packed(1)
    c = dfqkern.compile(q, mode="graph")
    with torch.no_grad():
        before = c(_x())
        q.load_state_dict(other.state_dict())
        want = other(_x())
        assert not torch.equal(before, want)
        assert torch.equal(c(_x()), want)


def test_graph_keeps_hooked_layers_as_module_calls():
    q = _packed()
    seen = []
    q.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    c = dfqkern.compile(q)
    with torch.no_grad():
        assert torch.equal(c(_x()), q(_x()))
    assert len(seen) == 2  # once per forward, compiled and eager


@pytest.mark.parametrize("mode", ["graph", "frozen"])
def test_graph_packed_layers_stay_inference_only(mode):
    c = dfqkern.compile(_packed(), mode=mode)
    with pytest.raises(RuntimeError, match="inference-only"):
        c(_x().requires_grad_()).sum().backward()


def test_argument_errors_and_no_pickling():
    q = _packed()
    with pytest.raises(ValueError, match="mode must be one of"):
        dfqkern.compile(q, mode="fast")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        dfqkern.compile(lambda x: x)
    with pytest.raises(TypeError, match="example_inputs must be"):
        dfqkern.compile(q, example_inputs=[_x()])
    with pytest.raises(TypeError, match="cannot be pickled"):
        import copy

        copy.deepcopy(dfqkern.compile(q))


class DataDependent(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if x.sum() > 0 else -self.inner(x)  # torch.fx cannot capture this branch


def test_capture_failure_falls_back_with_a_warning_or_raises():
    m = DataDependent(_packed())
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        assert dfqkern.compile(m) is m
    with pytest.raises(Exception, match="[Tt]race|symbolically"):
        dfqkern.compile(m, fallback=False)


def test_inductor_without_a_compiler_says_so(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    q = _packed()
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        dfqkern.compile(q, mode="inductor", fallback=False)
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        assert dfqkern.compile(q, mode="inductor") is q


@pytest.mark.slow
def test_inductor_logits_match_eager_packed_logits():
    """Inductor recompiles the float glue (it may sum in another order): a few ulp of the logits."""
    if dfqkern.runtime_compile._cxx_compiler() is None:
        pytest.skip("Inductor on CPU needs a C++ compiler; none on PATH")
    q = _packed()
    c = dfqkern.compile(q, mode="inductor", example_inputs=_x(), fallback=False)
    with torch.no_grad():
        got, want = c(_x()), q(_x())
    assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())
    assert any(isinstance(m, QuantLayer) for m in c.modules())


def test_loaded_checkpoint_compiles_through_the_runtime(tmp_path):
    from dfqkern.runtime import compile, load_quantized  # noqa: A004

    q = _packed()
    dfqkern.save_quantized(q, tmp_path / "ckpt", arch="tiny")
    c = compile(load_quantized(tmp_path / "ckpt", factory=TinyResNet))
    with torch.no_grad():
        assert torch.equal(c(_x()), q(_x()))


def test_graph_captures_a_packed_vit_with_quantized_attention():
    """The CIFAR ViT (dfqkern.vit_nets) traces: attention modules stay leaf module calls (their packed forward
    runs the cached eager call inside), the packed Linears outside them become direct calls; same logits."""
    from dfqkern.nn.attention import QuantAttentionBase
    from dfqkern.vit_nets import CifarViT

    torch.manual_seed(0)
    fp = CifarViT("qkv", dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=8, first_last_bits=8))
    calibrate_activations(q, x, progress=False)
    pack_model(q)
    c = dfqkern.compile(q, example_inputs=x[:1], fallback=False)
    gm = c._run.__self__
    mods = dict(gm.named_modules())
    called = [mods[n.target] for n in gm.graph.nodes if n.op == "call_module"]
    assert sum(isinstance(m, QuantAttentionBase) for m in called) == 2
    assert not [m for m in called if isinstance(m, QuantLayer)], gm.code
    with torch.no_grad():
        for n in (1, 3):
            assert torch.equal(c(x[:n]), q(x[:n]))


# ------------------------------------------------------------------------------------------- mode="frozen"

def _needs_cpu_backend():
    from dfqkern.kernels import available_backends

    if "cpu" not in available_backends():
        pytest.skip("mode='frozen' binds the CPU backend's kernels; dfqkern._C is not built here")


class Patterns(nn.Module):
    """Every glue pattern frozen mode fuses into a conv, and the ones it must leave alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())  # conv -> ReLU module
        self.a = nn.Conv2d(8, 8, 3, padding=1)   # F.relu(inplace=True)
        self.b = nn.Conv2d(8, 8, 3, padding=1)   # y = b(x); y += x; relu  (in-place add into the conv's output)
        self.c = nn.Conv2d(8, 8, 1)              # w = y + c(y)            (conv second, no ReLU)
        self.d = nn.Conv2d(8, 8, 3, padding=1)   # used twice: not fused
        self.e = nn.Conv2d(8, 8, 3, padding=1)   # s += e(w): torch.fx records += as +, so fused as conv second
        self.f = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise + broadcast residual (a buffer) + relu
        self.register_buffer("shift", torch.linspace(-0.5, 0.5, 8).view(1, 8, 1, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = nn.functional.relu(self.a(x), inplace=True)
        y = self.b(x)
        y += x
        y = torch.relu(y)
        w = y + self.c(y)
        t = self.d(w)
        w = t * 0.5 + t.relu()
        s = w.clone()
        s += self.e(w)
        z = (self.f(s) + self.shift).relu()
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(z, 1), 1))


def _packed_patterns():
    torch.manual_seed(0)
    m = Patterns().eval()
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(8, 3, 8, 8), progress=False)
    return pack_model(q).eval()


def _glue(gm):
    import operator

    names = {torch.relu: "relu", nn.functional.relu: "relu", operator.add: "add", operator.iadd: "iadd"}
    out = {}
    for n in gm.graph.nodes:
        key = names.get(n.target) if n.op == "call_function" else n.target if n.op == "call_method" else None
        if key:
            out[key] = out.get(key, 0) + 1
    return out


def _frozen_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and getattr(n.target, "__name__", "") == "__call__"]


def _kind(node) -> str:
    return type(node.target.__self__).__name__


def test_frozen_fuses_residual_and_relu_and_keeps_the_logits_bit_for_bit():
    _needs_cpu_backend()
    q = _packed_patterns()
    c = dfqkern.compile(q, mode="frozen", example_inputs=_x(), fallback=False)
    gm = c._run.__self__
    assert not [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                   QuantLayer)], gm.code
    frozen = _frozen_calls(gm)
    # 7 convs in 6 calls: stem -> ReLU -> a is one chained call (stem's output feeds only a); the head a linear call
    assert sorted(_kind(n) for n in frozen) == ["PackedConvCall"] * 5 + ["PackedConvChain", "PackedLinearCall"], gm.code
    # fused: stem / a ReLUs, b's += and relu, c's and e's adds, f's broadcast add + relu. Left: d's two uses
    # (t * 0.5 + t.relu(): one add, one relu method) and the clone.
    assert _glue(gm) == {"add": 1, "relu": 1, "clone": 1}, gm.code
    with torch.no_grad():
        for n in (1, 3):
            assert torch.equal(c(_x(n)), q(_x(n)))


def test_frozen_refuses_to_run_after_a_weight_write():
    """Unlike mode='graph', a frozen model reads the weights once: after a write it raises (never stale
    logits) until compiled again."""
    _needs_cpu_backend()
    q, other = _packed(0), _packed(1)
    c = dfqkern.compile(q, mode="frozen")
    with torch.no_grad():
        c(_x())
        q.load_state_dict(other.state_dict())
        with pytest.raises(RuntimeError, match="compile the model again"):
            c(_x())
        assert torch.equal(dfqkern.compile(q, mode="frozen")(_x()), other(_x()))


def test_frozen_leaves_convs_another_backend_serves_and_hooked_convs(monkeypatch):
    _needs_cpu_backend()
    q = _packed()
    seen = []
    q.conv1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    c = dfqkern.compile(q, mode="frozen", fallback=False)
    gm = c._run.__self__
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["conv1"]
    with torch.no_grad():
        assert torch.equal(c(_x()), q(_x()))
    assert len(seen) == 2
    monkeypatch.setenv("DFQKERN_BACKEND", "reference")
    assert q.conv2.frozen_call() is None  # the reference backend would run it: no CPU-kernel call bound
    c = dfqkern.compile(q, mode="frozen", fallback=False)
    with torch.no_grad():
        assert torch.equal(c(_x()), q(_x()))


def test_frozen_call_errors():
    _needs_cpu_backend()
    q = _packed()
    call = q.conv1.frozen_call(relu=True)
    assert call.relu
    with pytest.raises(TypeError, match="x must be float32"):
        call(torch.randn(1, 8, 8, 8).half())
    with pytest.raises(ValueError, match="channels"):
        call(torch.randn(1, 5, 8, 8))
    with torch.no_grad():  # a residual of another dtype takes ATen's add (type promotion as in the model)
        x = torch.randn(1, 8, 8, 8)
        r = torch.randn(1, 8, 8, 8, dtype=torch.float64)
        assert torch.equal(call(x, r), torch.relu(q.conv1(x) + r))
    fp = quantize_model(TinyResNet().eval(), QuantConfig(weight_bits=4, act_bits=8))
    with pytest.raises(RuntimeError, match="needs a packed layer"):
        fp.conv1.frozen_call()


def test_frozen_cifar_resnet20_fuses_every_block_and_matches_bit_for_bit():
    """The deployment target of the latency tables: every conv a frozen call, each block's residual add + ReLU
    fused into its second conv (the option-A shortcut's slice / pad stay float glue)."""
    _needs_cpu_backend()
    from dfqkern.models import create_model

    torch.manual_seed(0)
    fp = create_model("cifar10_resnet20").eval()
    q = quantize_model(fp, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax"))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    calibrate_activations(q, x, progress=False)
    pack_model(q)
    c = dfqkern.compile(q.eval(), example_inputs=x[:1], fallback=False)
    gm = c._run.__self__
    frozen = _frozen_calls(gm)
    # 19 convs: the stem, and each block's conv1 -> ReLU -> conv2 as one chained call taking the residual; the fc
    assert [_kind(n) for n in frozen] == ["PackedConvCall"] + ["PackedConvChain"] * 9 + ["PackedLinearCall"], gm.code
    frozen = frozen[:-1]
    assert sum(len(n.args) == 2 for n in frozen) == 9, gm.code  # 9 residual adds
    assert not _glue(gm), gm.code  # no add or ReLU left outside the convs
    # every output reaching only convs (the shortcut's slice + pad included) is channels-last; the last block's,
    # which feeds the average pool, stays NCHW
    assert [n.target.__self__.channels_last_out for n in frozen] == [True] * 9 + [False], gm.code
    with torch.no_grad():
        for n in (1, 3):
            assert torch.equal(c(x[:n]), q(x[:n]))



class MaxPooled(nn.Module):
    """torchvision-ResNet glue: stem -> ReLU -> MaxPool2d feeding a block and its residual; a functional max pool
    between two convs; a max pool with indices and an average pool, which must see what eager sees."""

    def __init__(self):
        super().__init__()
        self.stem, self.pool = nn.Conv2d(3, 16, 3, padding=1), nn.MaxPool2d(3, 2, 1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c, self.d = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.ipool = nn.MaxPool2d(2, return_indices=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        x = torch.relu(x + self.b(torch.relu(self.a(x))))
        y = self.d(nn.functional.max_pool2d(self.c(x), 2))  # c: through the functional max pool to d only
        v, _ = self.ipool(y)  # indices: left alone (d's output stays NCHW)
        z = torch.cat([nn.functional.adaptive_avg_pool2d(v, 1), nn.functional.adaptive_avg_pool2d(x, 1)], 1)
        return self.head(torch.flatten(z, 1))


def test_frozen_max_pool_carries_channels_last_and_keeps_the_logits_bit_for_bit():
    """Max pooling is layout-free glue (a max reads the same values in any order): a conv whose output reaches only
    convs through it writes channels-last (ATen's channels-last max pool is also the fast one). A pool returning
    indices, or an output that also feeds an average pool, keeps NCHW."""
    _needs_cpu_backend()
    torch.manual_seed(0)
    q = quantize_model(MaxPooled().eval(), QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                       act_observer="minmax"))
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    calibrate_activations(q, x, progress=False)
    pack_model(q.eval())
    c = dfqkern.compile(q, mode="frozen", example_inputs=x[:1], fallback=False)
    gm = c._run.__self__
    frozen = _frozen_calls(gm)
    assert [_kind(n) for n in frozen] == ["PackedConvCall", "PackedConvChain"] + ["PackedConvCall"] * 2 + [
        "PackedLinearCall"], gm.code
    # stem (through the MaxPool2d module, to a and to b's residual) and c (through F.max_pool2d to d): channels-
    # last; the a -> b chain's output also feeds an average pool and d's the indexed pool: NCHW
    assert [n.target.__self__.channels_last_out for n in frozen[:-1]] == [True, False, True, False], gm.code
    xs = x.clone()
    xs[0, 1, 2, 3], xs[1, 0, 5, 5], xs[2, 2, 0, 0] = float("nan"), float("inf"), -float("inf")
    with torch.no_grad():
        for inp in (x[:1], x, xs):
            want, got = q(inp), c(inp)
            assert torch.equal(want.isnan(), got.isnan()) and torch.equal(want.nan_to_num(), got.nan_to_num())

# ------------------------------------------------------------------------------- chained convs (frozen mode)

def _two_convs(first: nn.Conv2d, second: nn.Conv2d, act_bits: int, seed: int = 0):
    torch.manual_seed(seed)
    m = nn.Sequential(first, nn.ReLU(), second).eval()
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=act_bits, first_last_bits=None,
                                      weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(4, first.in_channels, 9, 11), progress=False)
    return pack_model(q).eval()


CHAIN_CASES = {  # first, second, act bits: awkward channel counts, groups, strides, a direct (1x1) second conv
    "3x3 -> 3x3 stride 2": (lambda: nn.Conv2d(5, 16, 3, padding=1), lambda: nn.Conv2d(16, 24, 3, stride=2, padding=1), 8),
    "groups, 16-ch groups": (lambda: nn.Conv2d(8, 32, 3, padding=1, groups=2),
                             lambda: nn.Conv2d(32, 8, 3, padding=2, dilation=2, groups=2), 8),
    "1x1 direct second, 20 ch": (lambda: nn.Conv2d(6, 20, (3, 1), padding=(1, 0)), lambda: nn.Conv2d(20, 7, 1), 4),
    "48 ch, no padding": (lambda: nn.Conv2d(4, 48, 2, stride=2), lambda: nn.Conv2d(48, 16, 3), 4),
}


@pytest.mark.parametrize("case", list(CHAIN_CASES))
@pytest.mark.parametrize("relu", [True, False])
def test_chained_convs_equal_the_two_calls_bit_for_bit(case, relu):
    """conv2d_chain_call(first, second)(x, r) == second(first(x), r) on every ISA this CPU runs, threads split or
    not, with NaN / Inf inputs poisoning the same outputs."""
    _needs_cpu_backend()
    from dfqkern.kernels import cpu

    first, second, abits = CHAIN_CASES[case]
    q = _two_convs(first(), second(), abits)
    a, b = q[0].frozen_call(relu=relu), q[2].frozen_call(relu=True)
    chain = cpu.conv2d_chain_call(a, b)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, q[0].in_channels, 9, 11, generator=g) * 2
    bad = x.clone()
    bad[1, 0, 4, 5], bad[2, 1, 0, 0], bad[2, 0, 8, 10] = float("nan"), float("inf"), float("-inf")
    with torch.no_grad():
        mid = a(x)
        r = torch.randn_like(b(mid))
        for isa in _cpu_isas():
            for cost in (None, 1):
                with cpu.use_isa(isa), (cpu.parallel_min_cost(cost) if cost else _nothing()):
                    assert torch.equal(chain(x), b(a(x))), (isa, cost)
                    assert torch.equal(chain(x, r), b(a(x), r)), (isa, cost)
                    want = b(a(bad))
                    assert want.isnan().any() and not want.isnan().all()
                    torch.testing.assert_close(chain(bad), want, rtol=0, atol=0, equal_nan=True)
                    torch.testing.assert_close(chain(bad, r), b(a(bad), r), rtol=0, atol=0, equal_nan=True)
        # channels-last: read in place, written on request, the same values; a residual of the other layout is
        # added by ATen (the same fp32 add)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert not x_cl.is_contiguous()
        want = b(a(x), r)
        for call in (chain, a, b):
            call.channels_last_out = True
        try:
            out = chain(x_cl, r)
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            assert torch.equal(out, want)
            assert torch.equal(chain(x_cl, r.contiguous(memory_format=torch.channels_last)), want)
            assert torch.equal(b(a(x_cl), r), want)
            assert a(x).is_contiguous(memory_format=torch.channels_last)
        finally:
            for call in (chain, a, b):
                call.channels_last_out = False
        assert chain(x_cl).is_contiguous()


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def _cpu_isas() -> list:
    """The kernel ISA levels this CPU runs (x86 and aarch64 names; the others raise ValueError)."""
    from dfqkern.kernels import cpu

    ok = []
    for isa in ("portable", "avx2", "avx512vnni", "amx", "neon", "dotprod"):
        try:
            with cpu.use_isa(isa):
                ok.append(isa)
        except ValueError:
            continue
    return ok


def test_depthwise_frozen_conv_reads_channels_last_and_keeps_nchw_out():
    _needs_cpu_backend()
    q = _packed()
    dw = q.conv2.frozen_call(relu=True)
    dw.channels_last_out = True  # no channels-last path for depthwise-style convs: the output stays NCHW
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = dw(x.contiguous(memory_format=torch.channels_last))
        assert out.is_contiguous() and torch.equal(out, torch.relu(q.conv2(x)))
        # the residual add + ReLU fused into the depthwise epilogue, NaN / Inf inputs poisoning the same outputs
        r = torch.randn(2, 8, 8, 8)
        bad = x.clone()
        bad[0, 3, 2, 2], bad[1, 0, 7, 7] = float("nan"), float("-inf")
        for xin in (x, bad):
            want = torch.relu(q.conv2(xin) + r)
            torch.testing.assert_close(dw(xin, r), want, rtol=0, atol=0, equal_nan=True)
        assert dw(bad, r).isnan().any()


def test_chain_needs_two_gemm_path_convs_and_follows_weight_writes():
    _needs_cpu_backend()
    from dfqkern import _C
    from dfqkern.kernels import cpu

    q = _packed()  # conv1 (8 -> 8) -> ReLU -> conv2 (depthwise: one input channel per group)
    a, dw = q.conv1.frozen_call(relu=True), q.conv2.frozen_call()
    assert a.gemm_path and not dw.gemm_path
    assert cpu.conv2d_chain_call(a, dw) is None
    with pytest.raises(ValueError, match="GEMM path"):
        _C.PackedConvChain(a, dw)
    q2 = _two_convs(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), 8)
    chain = cpu.conv2d_chain_call(q2[0].frozen_call(relu=True), q2[2].frozen_call())
    with torch.no_grad():
        chain(torch.randn(1, 3, 8, 8))
        with pytest.raises(ValueError, match="channels"):
            chain(torch.randn(1, 4, 8, 8))
        with pytest.raises(TypeError, match="float32"):
            chain(torch.randn(1, 3, 8, 8).double())
        q2[2].bias.add_(1.0)  # a write to the second conv's tensors
        with pytest.raises(RuntimeError, match="compile the model again"):
            chain(torch.randn(1, 3, 8, 8))
    with pytest.raises(RuntimeError, match="inference-only"):
        chain(torch.randn(1, 3, 8, 8, requires_grad=True))


# ------------------------------------------------------------------------------------ frozen packed Linear

@pytest.mark.parametrize("wbits", [2, 4, 8])
def test_frozen_linear_equals_the_packed_layer_bit_for_bit(wbits):
    """One row (the GEMV tiles) and several rows / 3-D input (the layout dispatch picks), every ISA."""
    _needs_cpu_backend()
    from dfqkern.kernels import cpu

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(70, 37), nn.ReLU(), nn.Linear(37, 11)).eval()
    q = quantize_model(m, QuantConfig(weight_bits=wbits, act_bits=8, first_last_bits=None, weight_observer="minmax",
                                      act_observer="minmax"))
    calibrate_activations(q, torch.randn(16, 70), progress=False)
    pack_model(q).eval()
    c = dfqkern.compile(q, fallback=False)
    assert [_kind(n) for n in _frozen_calls(c._run.__self__)] == ["PackedLinearCall"] * 2
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for isa in _cpu_isas():
            with cpu.use_isa(isa):
                for shape in ((1, 70), (70,), (5, 70), (2, 3, 70)):
                    x = torch.randn(*shape, generator=g)
                    assert torch.equal(c(x), q(x)), (isa, shape)
                    assert c(x).shape == shape[:-1] + (11,)


def test_frozen_linear_errors_and_what_it_leaves_alone():
    _needs_cpu_backend()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(12, 6)).eval()
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, weight_observer="minmax",
                                      act_observer="minmax"))
    calibrate_activations(q, torch.randn(8, 12), progress=False)
    pack_model(q).eval()
    call = q[0].frozen_call()
    with torch.no_grad():
        with pytest.raises(TypeError, match="x must be float32"):
            call(torch.randn(2, 12).double())
        with pytest.raises(ValueError, match="input features"):
            call(torch.randn(2, 13))
        q[0].bias.add_(0.5)
        with pytest.raises(RuntimeError, match="compile the model again"):
            call(torch.randn(2, 12))
    with pytest.raises(RuntimeError, match="inference-only"):
        q[0].frozen_call()(torch.randn(2, 12, requires_grad=True))
    pt = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, act_granularity="per_token"))
    calibrate_activations(pt, torch.randn(8, 12), progress=False)
    pack_model(pt).eval()
    assert pt[0].frozen_call() is None  # per-token activations: left to packed_forward
    with torch.no_grad():
        x = torch.randn(3, 12)
        assert torch.equal(dfqkern.compile(pt, fallback=False)(x), pt(x))
    with pytest.raises(RuntimeError, match="needs a packed layer"):
        quantize_model(m, QuantConfig(weight_bits=4, act_bits=8))[0].frozen_call()
