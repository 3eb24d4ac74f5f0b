"""The static part of the packed ops' contract (and the CPU backend's scalar arguments) runs once per
weight / activation parameters / geometry, and is redone when any of those change."""
import pytest
import torch

import kernel_cases  # noqa: F401  (first: triton must be imported under TRITON_INTERPRET on a CPU machine)
from dfqkern.formats import PackedWeight
from dfqkern.kernels import contract, dispatch, reference
from dfqkern.kernels.reference import ActQuant


def _conv_pw(o=8, c=4, k=3, bits=4):
    torch.manual_seed(0)
    codes = torch.randint(0, 2 ** bits, (o, c * k * k))
    return PackedWeight.from_codes(codes, torch.rand(o) + 0.1, torch.full((o,), 2 ** (bits - 1)), bits, (o, c, k, k))


def _act():
    return ActQuant(8, torch.tensor([0.05]), torch.tensor([128], dtype=torch.int32))


def test_cached_reruns_on_in_place_write_new_storage_and_new_key():
    calls = []
    t = torch.zeros(1)
    cache = {}

    def compute():
        calls.append(1)
        return len(calls)

    assert contract.cached(cache, "s", (1,), (t,), compute) == 1
    assert contract.cached(cache, "s", (1,), (t,), compute) == 1  # reused
    t.add_(1)  # in place: _version
    assert contract.cached(cache, "s", (1,), (t,), compute) == 2
    t.data = torch.ones(1)  # new storage, same object and version
    assert contract.cached(cache, "s", (1,), (t,), compute) == 3
    assert contract.cached(cache, "s", (2,), (t,), compute) == 4  # another key replaces the entry
    assert contract.cached(cache, "s", (2,), (t.clone(),), compute) == 5  # another tensor
    assert len(cache) == 1


def test_cached_inference_tensors_recompute():
    with torch.inference_mode():
        t = torch.zeros(1)
    n = []
    for _ in range(2):
        contract.cached({}, "s", (), (t,), lambda: n.append(1))
    assert len(n) == 2


def test_conv_act_zero_point_checked_again_after_in_place_change():
    pw, act = _conv_pw(), _act()
    x = torch.randn(1, 4, 6, 6)
    dispatch.conv2d(x, pw, None, act, padding=1)
    act.zero_point.fill_(300)  # outside [0, 255]: the cached "valid" must not survive
    with pytest.raises(ValueError, match="act.zero_point"):
        dispatch.conv2d(x, pw, None, act, padding=1)
    act.zero_point.fill_(100)
    dispatch.conv2d(x, pw, None, act, padding=1)


def test_static_part_reused_for_fresh_tensor_objects_with_the_same_contents(monkeypatch):
    """AOTInductor's proxy executor passes new tensor objects over the same constants at every call: the
    static part is keyed by what it reads (bias dtype / shape / device, the zero point's value), not by
    tensor identity, so those calls reuse it (identity keys recomputed it at every call)."""
    pw, act = _conv_pw(), _act()
    bias = torch.randn(8)
    x = torch.randn(1, 4, 6, 6)
    calls = []
    real = contract._conv2d_static
    monkeypatch.setattr(contract, "_conv2d_static", lambda *a: calls.append(1) or real(*a))
    want = dispatch.conv2d(x, pw, bias, act, padding=1)
    for _ in range(3):
        fresh = ActQuant(8, act.scale.clone(), act.zero_point.clone())
        assert torch.equal(dispatch.conv2d(x, pw, bias.clone(), fresh, padding=1), want)
    assert len(calls) == 1
    dispatch.conv2d(x, pw, bias.clone(), ActQuant(8, act.scale, torch.tensor([100], dtype=torch.int32)), padding=1)
    assert len(calls) == 2  # another zero point value: checked again
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        dispatch.conv2d(x, pw, torch.randn(7), act, padding=1)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_conv_result_follows_in_place_act_changes(backend):
    if backend not in dispatch.available_backends():
        pytest.skip(f"the {backend} backend is not available in this build")
    pw, act = _conv_pw(), _act()
    x = torch.randn(1, 4, 6, 6)
    dispatch.conv2d(x, pw, None, act, padding=1, backend=backend)  # fills the caches
    act.scale.mul_(2.0)
    act.zero_point.fill_(120)
    want = reference.conv2d(x, pw, None, ActQuant(8, act.scale.clone(), act.zero_point.clone()), padding=1)
    torch.testing.assert_close(dispatch.conv2d(x, pw, None, act, padding=1, backend=backend), want)


def test_conv_per_call_input_errors_after_cached_static_part():
    pw, act = _conv_pw(), _act()
    dispatch.conv2d(torch.randn(1, 4, 6, 6), pw, None, act, padding=1)
    with pytest.raises(ValueError, match="x has 3 channels, weight expects 4"):
        dispatch.conv2d(torch.randn(1, 3, 6, 6), pw, None, act, padding=1)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        dispatch.conv2d(torch.randn(1, 4, 2, 2), pw, None, act, padding=0)
    with pytest.raises(ValueError, match="x must be NCHW"):
        dispatch.conv2d(torch.randn(4, 6, 6), pw, None, act, padding=1)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        dispatch.conv2d(torch.zeros(1, 4, 6, 6, dtype=torch.int32), pw, None, act, padding=1)
    # the static part is checked again when its arguments change
    with pytest.raises(ValueError, match="stride must be >= 1"):
        dispatch.conv2d(torch.randn(1, 4, 6, 6), pw, None, act, stride=0)
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        dispatch.conv2d(torch.randn(1, 4, 6, 6), pw, torch.zeros(7), act, padding=1)


def test_conv_bias_resized_through_data_is_checked_again():
    pw, act = _conv_pw(), _act()
    bias = torch.nn.Parameter(torch.zeros(8), requires_grad=False)
    dispatch.conv2d(torch.randn(1, 4, 6, 6), pw, bias, act, padding=1)
    bias.data = torch.zeros(5)  # what Module.to does to parameters: same object and _version
    with pytest.raises(ValueError, match="bias must have 8 elements"):  # (the reference has no guard of its own)
        dispatch.conv2d(torch.randn(1, 4, 6, 6), pw, bias, act, padding=1, backend="reference")


def test_linear_per_call_and_static_errors():
    torch.manual_seed(0)
    pw = PackedWeight.from_codes(torch.randint(0, 16, (8, 32)), torch.rand(8) + 0.1, torch.full((8,), 8), 4)
    act = ActQuant(8, per_token=True)
    dispatch.linear(torch.randn(2, 32), pw, None, act)
    with pytest.raises(ValueError, match="weight expects K=32"):
        dispatch.linear(torch.randn(2, 31), pw, None, act)
    with pytest.raises(ValueError, match="out_dtype"):
        dispatch.linear(torch.randn(2, 32), pw, None, act, out_dtype=torch.int8)
    bias = torch.zeros(8)
    dispatch.linear(torch.randn(2, 32), pw, bias, act)
    bias.data = torch.zeros(3)
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        dispatch.linear(torch.randn(2, 32), pw, bias, act, backend="reference")


def test_packed_layer_follows_in_place_act_param_changes():
    from dfqkern import QuantConfig, calibrate_activations, pack_model, quantize_model

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1))
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(4, 3, 8, 8), progress=False)
    pack_model(q)
    layer = q[0]
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        before = layer(x)
        layer.a_quant.zero_point.fill_(400)  # in place, as load_state_dict writes buffers
        with pytest.raises(ValueError, match="act.zero_point"):
            layer(x)
        layer.a_quant.zero_point.fill_(0)
        layer.a_quant.scale.mul_(3.0)
        after = layer(x)
    assert not torch.equal(before, after)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_load_state_dict_into_a_used_packed_model_serves_the_new_weights(backend, monkeypatch):
    """Backend layouts derived from the old codes (PackedWeight.cache) must not survive load_state_dict,
    which copies the new codes into the same buffers (found: the CPU tile cache served stale weights)."""
    if backend == "cpu" and "cpu" not in dispatch.available_backends():
        pytest.skip("dfqkern._C with CPU ops is not built")
    monkeypatch.setenv("DFQKERN_BACKEND", backend)
    from torch import nn

    from dfqkern import QuantConfig, calibrate_activations, pack_model, quantize_model

    def make(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).eval()
        q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8))
        calibrate_activations(q, torch.randn(16, 3, 8, 8), progress=False)
        return pack_model(q).eval()

    a, b = make(0), make(1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a(x)  # derive and cache a's layouts
        a.load_state_dict(b.state_dict())
        assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- a packed layer's eager call
# Without autograd a packed layer runs a PackedCall resolved once (nn.base.QuantLayer.packed_forward); each
# test changes one thing that call was built from and fails if the stale call were served.

def _packed_net(seed=0):
    from torch import nn

    from dfqkern import QuantConfig, calibrate_activations, pack_model, quantize_model

    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    q = quantize_model(m, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax", act_observer="minmax",
                                      first_last_bits=None))
    calibrate_activations(q, torch.randn(8, 3, 6, 6), progress=False)
    return pack_model(q).eval()


def _x():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_eager_call_is_built_once_and_skips_the_per_call_view(monkeypatch):
    from dfqkern import autograd

    q = _packed_net()
    with torch.no_grad():
        want = q(_x())
        calls = q[0]._eager, q[3]._eager
        assert all(c is not None for c in calls)
        monkeypatch.setattr(autograd, "packed_weight_view", lambda *a: pytest.fail("per-call PackedWeight view"))
        assert torch.equal(q(_x()), want)
    assert (q[0]._eager, q[3]._eager) == calls


@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("change", ["in_place", "data_swap", "new_buffer"])
def test_eager_call_follows_weight_changes(layer, change):
    """Another net's weights written into a used packed layer three ways (load_state_dict's copy, Module.to's
    storage swap, a new buffer): the layer must then compute what the other net's layer computes."""
    q, other = _packed_net(0), _packed_net(1)
    x = _x() if layer == 0 else torch.randn(2, 8 * 6 * 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = q[layer](x)  # builds the eager call and the backend layouts
        want = other[layer](x)
        assert not torch.equal(before, want)
        src, dst = other[layer], q[layer]
        for name in ("packed_weight", "w_scale", "w_zero"):
            new = getattr(src, name).clone()
            if change == "in_place":
                getattr(dst, name).copy_(new)
            elif change == "data_swap":  # what Module.to does to parameters: same object and _version
                getattr(dst, name).data = new
            else:
                setattr(dst, name, new)
        dst.bias.copy_(src.bias)
        dst.a_quant.load_state_dict(src.a_quant.state_dict())
        assert torch.equal(q[layer](x), want)


def test_eager_call_follows_bias_resize_and_geometry():
    q = _packed_net()
    q[0].backend = "reference"  # (the CPU kernel's C++ wrapper checks the bias too)
    with torch.no_grad():
        q(_x())
        q[0].bias.data = torch.zeros(5)  # storage swap: the contract's "bias must have 8 elements" must run again
        with pytest.raises(ValueError, match="bias must have 8 elements"):
            q[0](_x())
        q[0].bias.data = torch.zeros(8)
        assert q[0](_x()).shape == (2, 8, 6, 6)
        q[0].padding = (0, 0)
        assert q[0](_x()).shape == (2, 8, 4, 4)


def test_eager_call_follows_the_backend_choice(monkeypatch):
    from dfqkern.kernels import reference

    if "cpu" not in dispatch.available_backends():
        pytest.skip("dfqkern._C with CPU ops is not built: cpu and reference are the same choice")
    q = _packed_net()
    used = []

    def counting(*a, **k):
        used.append(1)
        return real(*a, **k)

    real = reference.conv2d
    monkeypatch.setattr(reference, "conv2d", counting)
    with torch.no_grad():
        q(_x())
        assert not used  # the CPU backend first
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
        q(_x())
        assert len(used) == 1
        monkeypatch.delenv(dispatch.ENV_VAR)
        q(_x())
        assert len(used) == 1
        q[0].backend = "reference"  # what dfqkern.quantize.set_backend writes
        q(_x())
        assert len(used) == 2
        q[0].backend = "no-such-backend"
        with pytest.raises(ValueError, match="backend must be one of"):
            q(_x())


def test_eager_call_is_neither_copied_nor_pickled(tmp_path):
    import copy

    q = _packed_net()
    with torch.no_grad():
        want = q(_x())
        c = copy.deepcopy(q)
        assert c[0]._eager is None  # rebuilt over the copy's own tensors
        c[0].packed_weight.zero_()
        assert torch.equal(q(_x()), want) and not torch.equal(c(_x()), want)
        torch.save(q, tmp_path / "m.pt")  # a closure in the state would not pickle
        assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=False)(_x()), want)


def test_inference_mode_tensors_take_the_generic_path():
    q = _packed_net()
    with torch.inference_mode():
        want = q(_x())
        q[0].w_scale = q[0].w_scale * 2  # an inference tensor: no version counter to cache on
        got = q(_x())
        q[0].w_scale = q[0].w_scale * 2
        again = q(_x())
    assert not torch.equal(got, want) and not torch.equal(again, got)
    assert q[0]._eager is None


def test_grad_requiring_input_takes_the_custom_op():
    q = _packed_net()
    x = _x().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        q(x).sum().backward()


@pytest.mark.parametrize("cfg", [dict(act_bits=None), dict(act_granularity="per_token", act_symmetric=True),
                                 dict(weight_bits=8, act_bits=4)], ids=["weight-only", "per-token", "w8a4"])
def test_eager_call_equals_the_per_call_path(cfg):
    """The resolved eager call computes what the per-call implementation (the custom op's body) computes,
    for the activation settings its ActQuant is built from."""
    from torch import nn

    from dfqkern import QuantConfig, calibrate_activations, pack_model, quantize_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    q = quantize_model(m, QuantConfig(weight_observer="minmax", act_observer="minmax", first_last_bits=None, **cfg))
    calibrate_activations(q, torch.randn(8, 16), progress=False)
    pack_model(q).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        h = q[0](x)
        assert q[0]._eager is not None
        assert torch.equal(h, q[0]._packed_op(x))
        assert torch.equal(q[2](h.relu()), q[2]._packed_op(h.relu()))


@pytest.mark.parametrize("path", ["eager", "custom-op", "inference-mode"])
def test_a_dropped_packed_model_frees_its_weights(path):
    """The per-weight layout cache must not keep a packed model's codes alive after the model is gone
    (it once held every PackedWeight, and with it the codes, for the whole process)."""
    import gc
    import weakref

    from dfqkern import autograd

    q = _packed_net()
    codes = weakref.ref(q[0].packed_weight)
    x = _x()
    if path == "eager":
        with torch.no_grad():
            q(x)
    elif path == "custom-op":
        x.requires_grad_()
        q(x)  # the custom op's per-call view (inference-only: no backward)
    else:
        with torch.inference_mode():
            q(x)
    assert id(q[0].packed_weight) in autograd._PACKED_VIEWS or path == "eager"
    del q
    gc.collect()
    assert codes() is None
