"""QuantLinear / QuantConv2d: packed mode equals fake-quant mode for every scheme and conv option,
integer accumulations are exact, state_dict round-trips, bad input gets clear errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfqkern.config import LayerQuant, QuantConfig
from dfqkern.formats import conv_weight_to_matrix, packed_width
from dfqkern.kernels import reference as R
from dfqkern.nn import QuantConv2d, QuantLinear
from test_reference import conv_int64  # independent int64 convolution (tests/ is on sys.path under pytest)

WBITS = (2, 3, 4, 8)
ABITS = (None, 4, 8)
CFG = QuantConfig(grid=20)  # mse observers with a short grid: same code paths, faster


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def calibrate(q, x):
    if q.a_quant is not None and not q.a_quant.per_token:
        q.a_quant.set_mode("observe")
        q(x)
        q.a_quant.finalize()
    return q


def make_linear(k, n, bias, wb, ab, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    q = QuantLinear.from_float(lin, LayerQuant(wb, ab), cfg, name="fc")
    return lin, calibrate(q, torch.randn(64, k, generator=_gen(seed + 1)))


CONV_OPTIONS = {
    # name: (cin, cout, kernel, stride, padding, dilation, groups, bias, hw)
    "3x3": (3, 8, 3, 1, 1, 1, 1, True, (8, 8)),
    "3x3_s2_nobias": (5, 6, 3, 2, 1, 1, 1, False, (9, 7)),
    "5x5_pad2": (4, 5, 5, 1, 2, 1, 1, True, (7, 9)),
    "1x1": (6, 10, 1, 1, 0, 1, 1, True, (5, 5)),
    "1x1_s2": (6, 3, 1, 2, 0, 1, 1, False, (6, 7)),
    "depthwise": (6, 6, 3, 1, 1, 1, 6, True, (6, 6)),
    "depthwise_x2_s2": (4, 8, 3, 2, 1, 1, 4, False, (7, 7)),
    "groups2_dil2": (4, 6, 3, 1, 2, 2, 2, True, (9, 8)),
    "nonsquare": (3, 5, (1, 3), (2, 1), (0, 1), (1, 2), 1, True, (6, 8)),
    "nonsquare_pad": (2, 3, (3, 2), 1, (1, 0), 1, 1, False, (5, 6)),
}


def make_conv(opt, wb, ab, cfg=CFG, seed=0):
    cin, cout, ks, stride, padding, dilation, groups, bias, hw = opt
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, ks, stride, padding, dilation, groups, bias=bias)
    q = QuantConv2d.from_float(conv, LayerQuant(wb, ab), cfg, name="conv")
    return conv, calibrate(q, torch.randn(8, cin, *hw, generator=_gen(seed + 1)))


# ----------------------------------------------------------------------------- packed == fake-quant

@pytest.fixture(params=["auto", "reference"])
def backend_env(request, monkeypatch):
    """Packed layers dispatch automatically (the compiled CPU backend when built); also force the reference."""
    from dfqkern.kernels import dispatch

    if request.param == "reference":
        monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    else:
        monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    return request.param


@pytest.mark.parametrize("ab", ABITS)
@pytest.mark.parametrize("wb", WBITS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_packed_equals_fake_quant(wb, ab, bias, backend_env):
    k, n = 13, 7  # K odd: every packed width pads
    _, q = make_linear(k, n, bias, wb, ab)
    x = torch.randn(3, 5, k, generator=_gen(9))
    with torch.no_grad():
        y_fq = q(x)
        w_codes = q.w_quant.codes(q.weight).long()
        w_zp = q.w_quant.zero_point.long()
        if ab is not None:
            a = q.a_quant
            a_codes = R.quantize(x.reshape(-1, k), a.scale, a.zero_point, ab).long()
            acc_fq = (a_codes - a.zero_point.long()) @ (w_codes - w_zp[:, None]).T
    q.pack()
    assert q.is_packed and "weight" not in q.state_dict()
    assert q.packed_weight.dtype == torch.uint8 and q.packed_weight.shape == (n, packed_width(k, wb))
    with torch.no_grad():
        y_p = q(x)
    assert y_p.shape == y_fq.shape == (3, 5, n)
    assert rel(y_p, y_fq) <= 1e-5
    assert torch.equal(q.packed().codes().long(), w_codes)
    if ab is not None:  # the integer accumulation of the packed path equals the fake-quant codes' product
        a = q.a_quant
        pa = R.quantize_activation(x.reshape(-1, k), R.ActQuant(ab, a.scale.detach(), a.zero_point))
        assert torch.equal(R.linear_int(pa, q.packed()).long(), acc_fq)


@pytest.mark.parametrize("opt", list(CONV_OPTIONS.values()), ids=list(CONV_OPTIONS))
@pytest.mark.parametrize("ab", ABITS)
@pytest.mark.parametrize("wb", WBITS)
def test_conv_packed_equals_fake_quant(opt, wb, ab):
    _check_conv_packed_equals_fake_quant(opt, wb, ab)


@pytest.mark.parametrize("opt", [CONV_OPTIONS[n] for n in ("3x3_s2_nobias", "depthwise_x2_s2", "nonsquare")],
                         ids=["3x3_s2_nobias", "depthwise_x2_s2", "nonsquare"])
@pytest.mark.parametrize("ab", ABITS)
@pytest.mark.parametrize("wb", WBITS)
def test_conv_packed_equals_fake_quant_reference_backend(opt, wb, ab, monkeypatch):
    from dfqkern.kernels import dispatch

    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    _check_conv_packed_equals_fake_quant(opt, wb, ab)


def _check_conv_packed_equals_fake_quant(opt, wb, ab):
    conv, q = make_conv(opt, wb, ab)
    cin, hw = opt[0], opt[-1]
    x = torch.randn(2, cin, *hw, generator=_gen(3))
    with torch.no_grad():
        y_fq = q(x)
        w_int = q.w_quant.codes(q.weight).long() - q.w_quant.zero_point.long().reshape(-1, 1, 1, 1)
        if ab is not None:
            a = q.a_quant
            x_codes = R.quantize(x, a.scale, a.zero_point, ab)
            acc_fq = conv_int64(x_codes.long() - a.zero_point.long(), w_int, q.stride, q.padding, q.dilation,
                                q.groups)
    assert y_fq.shape == conv(x).shape
    q.pack()
    with torch.no_grad():
        y_p = q(x)
    assert y_p.shape == y_fq.shape
    assert rel(y_p, y_fq) <= 1e-5
    pw = q.packed()
    assert pw.shape == tuple(conv.weight.shape)
    assert torch.equal(pw.int_matrix().long(), conv_weight_to_matrix(w_int))
    if ab is not None:
        acc = R.conv2d_int(x_codes, q.a_quant.zero_point, pw, q.stride, q.padding, q.dilation, q.groups)
        assert torch.equal(acc.long(), acc_fq)


@pytest.mark.parametrize("k", [8, 7])
@pytest.mark.parametrize("ab", [4, 8])
@pytest.mark.parametrize("wb", [2, 4])
def test_linear_per_token_packed_equals_fake_quant(wb, ab, k):
    cfg = CFG.replace(act_granularity="per_token")
    _, q = make_linear(k, 5, True, wb, ab, cfg)
    assert q.a_quant.per_token
    x = torch.randn(2, 6, k, generator=_gen(4)) * torch.linspace(0.1, 10, 6)[None, :, None]  # token ranges differ
    with torch.no_grad():
        y_fq = q(x)
        rows = x.reshape(-1, k)
        s, z = R.qparams_from_range(rows.amin(1), rows.amax(1), ab, False)
        ref = F.linear(R.fake_quant_forward(rows, s, z, ab, 0), q.quant_weight(), q.bias).reshape(2, 6, 5)
        assert torch.equal(y_fq, ref)
        q.pack()
        y_p = q(x)
    assert rel(y_p, y_fq) <= 1e-5


def test_conv_with_per_token_config_quantizes_per_tensor():
    cfg = CFG.replace(act_granularity="per_token")
    _, q = make_conv(CONV_OPTIONS["3x3"], 4, 8, cfg)
    assert not q.a_quant.per_token and bool(q.a_quant.calibrated)
    x = torch.randn(2, 3, 8, 8, generator=_gen(5))
    with torch.no_grad():
        y_fq = q(x)
        q.pack()
        assert rel(q(x), y_fq) <= 1e-5


def test_fake_quant_mode_is_the_quantized_float_op():
    conv, q = make_conv(CONV_OPTIONS["groups2_dil2"], 4, 8)
    x = torch.randn(2, 4, 9, 8, generator=_gen(6))
    a, w = q.a_quant, q.w_quant
    ref = F.conv2d(R.fake_quant_forward(x, a.scale, a.zero_point, 8),
                   R.fake_quant_forward(conv.weight, w.scale, w.zero_point, 4, 0), conv.bias, conv.stride,
                   conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        assert torch.equal(q(x), ref)
    # W8A8 stays close to the float layer (sanity of the observers)
    _, q8 = make_conv(CONV_OPTIONS["3x3"], 8, 8)
    x = torch.randn(4, 3, 8, 8, generator=_gen(7))
    conv8 = nn.Conv2d(3, 8, 3, 1, 1)
    with torch.no_grad():
        conv8.weight.copy_(q8.weight)
        conv8.bias.copy_(q8.bias)
        assert rel(q8(x), conv8(x)) < 0.02


def test_from_float_copies_and_leaves_original():
    lin = nn.Linear(6, 4)
    before = {k: v.clone() for k, v in lin.state_dict().items()}
    q = QuantLinear.from_float(lin, LayerQuant(4, None), CFG)
    assert torch.equal(q.weight, lin.weight) and q.weight is not lin.weight
    q.pack()
    assert all(torch.equal(v, before[k]) for k, v in lin.state_dict().items())
    assert not q.bias.requires_grad  # packed layers are inference-only


def test_pack_is_idempotent_and_needs_calibration():
    lin = nn.Linear(6, 4)
    q = QuantLinear.from_float(lin, LayerQuant(4, 8), CFG)
    with pytest.raises(RuntimeError, match="pack\\(\\) needs calibrated activation quantizers"):
        q.pack()
    with pytest.raises(RuntimeError, match="activation quantizer used before calibration"):
        q(torch.randn(2, 6))
    calibrate(q, torch.randn(16, 6))
    assert q.pack() is q
    data = q.packed_weight
    assert q.pack() is q and q.packed_weight is data


# ----------------------------------------------------------------------------- state_dict

def _fresh_like(q, packed):
    if isinstance(q, QuantLinear):
        return QuantLinear(q.in_features, q.out_features, q.bias is not None, q.lq, q.cfg, packed=packed)
    return QuantConv2d(q.in_channels, q.out_channels, q.kernel_size, q.stride, q.padding, q.dilation, q.groups,
                       q.bias is not None, q.lq, q.cfg, packed=packed)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scheme", [(2, 4), (3, None), (4, 8), (8, 8)])
def test_state_dict_round_trip(kind, scheme):
    wb, ab = scheme
    if kind == "linear":
        _, q = make_linear(11, 6, True, wb, ab)
        x = torch.randn(4, 11, generator=_gen(8))
    else:
        _, q = make_conv(CONV_OPTIONS["depthwise_x2_s2"], wb, ab)
        x = torch.randn(2, 4, 7, 7, generator=_gen(8))
    with torch.no_grad():
        y = q(x)
        q2 = _fresh_like(q, packed=False)
        q2.load_state_dict(q.state_dict())
        assert torch.equal(q2(x), y)
        q.pack()
        y_p = q(x)
        q3 = _fresh_like(q, packed=True)
        q3(x) if ab is None else None  # a forward before loading (placeholder buffers) must not stick
        missing, unexpected = q3.load_state_dict(q.state_dict())
        assert not missing and not unexpected
        assert torch.equal(q3(x), y_p)
    # a fresh module holds different (placeholder) values: the comparison above can fail
    assert not torch.equal(_fresh_like(q, packed=True).state_dict()["w_scale"], q.state_dict()["w_scale"])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_after_adaround(kind):
    if kind == "linear":
        _, q = make_linear(9, 5, True, 3, 8)
        x = torch.randn(4, 9, generator=_gen(10))
    else:
        _, q = make_conv(CONV_OPTIONS["3x3"], 3, 8)
        x = torch.randn(2, 3, 8, 8, generator=_gen(10))
    v = q.w_quant.start_adaround(q.weight)
    with torch.no_grad():
        v.add_(torch.randn(v.shape, generator=_gen(11)) * 3)  # some learned rounding decisions
    q2 = _fresh_like(q, packed=False)
    q2.load_state_dict(q.state_dict())
    assert q2.w_quant.alpha is not None and q2.w_quant.rounding == "hard"
    q.w_quant.harden()
    with torch.no_grad():
        y_hard = q(x)
        assert torch.equal(q2(x), y_hard)
        # packing keeps the learned rounding: packed == hard fake-quant
        q2.pack()
        assert rel(q2(x), y_hard) <= 1e-5
        codes = q.w_quant.codes(q.weight)
        nearest = R.quantize(q.weight, q.w_quant.scale, q.w_quant.zero_point, 3, 0)
        assert not torch.equal(codes, nearest)  # the rounding really differs from round-to-nearest
        mat = conv_weight_to_matrix(codes) if codes.dim() == 4 else codes
        assert torch.equal(q2.packed().codes(), mat)


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_rejected(bad):
    lin = nn.Linear(4, 3)
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        lin.weight[1, 2] = bad
        conv.weight[0, 1, 2, 2] = bad
    with pytest.raises(ValueError, match=r"blocks\.0\.fc\.weight contains NaN or Inf"):
        QuantLinear.from_float(lin, LayerQuant(4, 8), CFG, name="blocks.0.fc")
    with pytest.raises(ValueError, match=r"stem\.weight contains NaN or Inf"):
        QuantConv2d.from_float(conv, LayerQuant(4, 8), CFG, name="stem")


def test_conv_construction_errors():
    with pytest.raises(ValueError, match="layer1.conv: cannot quantize a Conv2d with padding_mode='reflect'"):
        QuantConv2d.from_float(nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), LayerQuant(4, 8), CFG,
                               name="layer1.conv")
    with pytest.raises(ValueError, match="padding='same' that needs asymmetric padding"):
        QuantConv2d.from_float(nn.Conv2d(2, 3, 4, padding="same"), LayerQuant(4, 8), CFG)
    with pytest.raises(ValueError, match="groups=4 must divide in_channels=6 and out_channels=8"):
        QuantConv2d(6, 8, 3, 1, 1, 1, 4, True, LayerQuant(4, 8), CFG)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_string_padding(padding):
    conv = nn.Conv2d(3, 4, (3, 5), padding=padding, dilation=(2, 1))
    q = QuantConv2d.from_float(conv, LayerQuant(8, None), CFG)
    x = torch.randn(1, 3, 9, 10)
    with torch.no_grad():
        y = q(x)
        assert y.shape == conv(x).shape
        assert rel(y, conv(x)) < 0.02
        q.pack()
        assert q(x).shape == conv(x).shape


def test_packed_forward_errors_name_the_argument():
    _, q = make_linear(8, 4, True, 4, 8)
    q.pack()
    with pytest.raises(ValueError, match="x has 7 input features, weight expects K=8"):
        q(torch.randn(2, 7))
    with pytest.raises(TypeError, match=r"x must be (a floating-point tensor|float32, float16 or bfloat16)"):
        q(torch.ones(2, 8, dtype=torch.int64))
    _, c = make_conv(CONV_OPTIONS["3x3"], 4, 8)
    c.pack()
    with pytest.raises(ValueError, match="x has 4 channels, weight expects 3"):
        c(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="x must be NCHW"):
        c(torch.randn(3, 8, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (device-mismatch error)")
def test_packed_forward_device_mismatch_names_argument():
    _, q = make_linear(8, 4, True, 4, 8)
    q.pack()
    with pytest.raises((ValueError, RuntimeError), match="x=cuda"):
        q(torch.randn(2, 8, device="cuda"))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_packed_modules_compile_fullgraph(kind):
    import torch._dynamo

    if kind == "linear":
        _, q = make_linear(12, 6, True, 4, 8)
        x = torch.randn(3, 12)
    else:
        _, q = make_conv(CONV_OPTIONS["depthwise"], 4, 8)
        x = torch.randn(1, 6, 6, 6)
    q.pack()
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(q, backend="eager", fullgraph=True)(x), q(x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_nan_or_inf_input_gives_nan_not_a_confident_prediction(backend, monkeypatch):
    """Issue 15 item 4: a NaN / Inf input must not turn into a finite prediction, in fake-quant and packed
    mode, on every CPU backend (the kernel suites cover each backend op by op, the GPU ones included)."""
    import dfqkern
    from dfqkern.kernels import available_backends
    from dfqkern.models import create_model

    if backend not in available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    monkeypatch.setenv("DFQKERN_BACKEND", backend)
    torch.manual_seed(0)
    model = create_model("digits_cnn").eval()
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    x[1, 0, 2, 3] = float("nan")
    x[2, 0, 5, 5] = float("inf")
    with torch.no_grad():
        y_float = model(x)
    q = dfqkern.quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                  act_observer="minmax"))
    dfqkern.calibrate_activations(q, torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                                  progress=False)
    with torch.no_grad():
        y_fake = q(x)
        dfqkern.pack_model(q)
        y_packed = q(x)
    assert not bool(torch.isfinite(y_float[1:]).all(dim=1).any())  # the float model: no finite logits
    for name, y in (("fake-quant", y_fake), ("packed", y_packed)):
        assert bool(torch.isfinite(y[0]).all()), name  # a clean sample is untouched
        assert bool(torch.isnan(y[1:]).all()), (name, y[1:])  # NaN / Inf samples: NaN logits, no argmax winner
