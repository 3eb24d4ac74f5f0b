"""``dfqkern.export.pt2``: packed models through torch.export + AOTInductor, run in a fresh process.

AOTInductor compiles C++ (10-30 s per model on one core): the fast tests compile once; the other
schemes and architectures are marked slow.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dfqkern.config import QuantConfig
from dfqkern.export.pt2 import export_pt2, load_pt2
from dfqkern.model_info import model_info
from dfqkern.models import create_model
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model

REPO = Path(__file__).resolve().parents[2]

# What the fresh process runs: torch and the package loader only, then reports what got imported.
_RUNNER = r"""
import json, sys, torch
from dfqkern.export.pt2 import load_pt2, package_metadata
model = load_pt2(sys.argv[1])
inputs = torch.load(sys.argv[2], weights_only=True)
outs = [model(x) for x in inputs]
torch.save(outs, sys.argv[3])
heavy = [m for m in ("dfqkern.calib", "dfqkern.datagen", "dfqkern.pipeline", "dfqkern.models", "timm", "diffusers")
         if m in sys.modules]
print(json.dumps({"meta": package_metadata(model), "heavy": heavy}))
"""


def _packed(arch: str, cfg: QuantConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch)
    for m in model.modules():  # random, non-trivial BatchNorm statistics to fold
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    c, h, w = model_info(model).input_spec.input_size
    q = quantize_model(model, cfg)
    calibrate_activations(q, torch.randn(16, c, h, w), progress=False)
    return pack_model(q).eval()


def _run_fresh(tmp_path: Path, package: Path, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], dict]:
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _RUNNER, str(package), str(tmp_path / "inputs.pt"),
                        str(tmp_path / "outs.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(tmp_path / "outs.pt", weights_only=True), json.loads(r.stdout.strip().splitlines()[-1])


def _assert_same_logits(got: torch.Tensor, ref: torch.Tensor) -> None:
    # The packed layers run the same registered op (AOTInductor's proxy executor calls it back), so
    # their integer accumulation is identical; only the float glue (ReLU, pooling, adds) is recompiled
    # by Inductor and may sum in another order: a few float32 ulp of the logits' magnitude, hence
    # atol = 1e-5 * max|logit|. (Measured: bit-identical on an AVX-512 CPU.)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    tol = 1e-5 * max(1.0, ref.abs().max().item())
    assert (got - ref).abs().max().item() <= tol, (got - ref).abs().max().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def _check_roundtrip(tmp_path, model, example, batches, metadata=None):
    with torch.inference_mode():
        refs = [model(x) for x in batches]
    package = export_pt2(model, tmp_path / "model.pt2", (example,), metadata=metadata)
    outs, report = _run_fresh(tmp_path, package, batches)
    for got, ref in zip(outs, refs):
        _assert_same_logits(got, ref)
    return package, report


def test_w4a8_cnn_with_w8a8_layers_runs_in_a_fresh_process(tmp_path):
    """digits CNN at W4A8 keeps its first conv and the classifier at W8A8 (first_last_bits=8): one
    compile covers both weight widths, conv and linear; a dynamic batch runs batch 1, 2 and 5."""
    model = _packed("digits_cnn", QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                              act_observer="minmax"))
    bits = {(m.lq.weight_bits, m.lq.act_bits) for m in model.modules() if hasattr(m, "lq")}
    assert bits == {(4, 8), (8, 8)}
    torch.manual_seed(1)
    batches = [torch.randn(b, 1, 8, 8) for b in (1, 2, 5)]
    package, report = _check_roundtrip(tmp_path, model, torch.randn(2, 1, 8, 8), batches, metadata={"scheme": "w4a8"})
    assert report["heavy"] == []  # loading needs no calibration / datagen / model registry code
    assert report["meta"]["dfqkern_arch"] == "digits_cnn" and report["meta"]["scheme"] == "w4a8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inputs.pt", "model.pt2", "outs.pt"]  # no temporaries
    umask = os.umask(0)
    os.umask(umask)
    assert package.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file write's permissions
    # the same package in this process through load_pt2
    with torch.inference_mode():
        _assert_same_logits(load_pt2(package)(batches[2]), model(batches[2]))


@pytest.mark.slow
@pytest.mark.parametrize("arch,wbits,abits", [("digits_cnn", 8, 8), ("digits_cnn", 2, 4),
                                              ("cifar10_resnet20", 4, 4)])
def test_more_schemes_and_residual_nets(tmp_path, arch, wbits, abits):
    """Every layer at W8A8, W2A4 (first_last_bits=None), and ResNet-20's residual adds at W4A4."""
    cfg = QuantConfig(weight_bits=wbits, act_bits=abits, weight_observer="minmax", act_observer="minmax",
                      first_last_bits=None if arch == "digits_cnn" else 8)
    model = _packed(arch, cfg)
    c, h, w = model_info(model).input_spec.input_size
    torch.manual_seed(2)
    _check_roundtrip(tmp_path, model, torch.randn(2, c, h, w), [torch.randn(b, c, h, w) for b in (1, 3)])


class _TokenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 8)

    def forward(self, x):  # (batch, tokens, features): per-token activations
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.mark.slow
@pytest.mark.parametrize("abits,per_token", [(8, True), (None, False)])
def test_per_token_and_weight_only_linear(tmp_path, abits, per_token):
    torch.manual_seed(0)
    cfg = QuantConfig(weight_bits=4, act_bits=abits, act_granularity="per_token" if per_token else "per_tensor",
                      weight_observer="minmax", act_observer="minmax", first_last_bits=None)
    q = quantize_model(_TokenMLP().eval(), cfg)
    calibrate_activations(q, torch.randn(8, 5, 16), progress=False)
    pack_model(q)
    _check_roundtrip(tmp_path, q, torch.randn(2, 5, 16), [torch.randn(b, 5, 16) for b in (1, 4)])


# ----------------------------------------------------------------------------- packed attention

def _packed_vit(variant: str, **cfg) -> tuple[nn.Module, torch.Tensor]:
    from dfqkern.vit_nets import CifarViT

    torch.manual_seed(0)
    model = CifarViT(variant, dim=32, depth=2, num_heads=2).eval()
    with torch.no_grad():  # larger weights than the init give the attention maps some structure
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None, grid=20, **cfg))
    calibrate_activations(q, x, progress=False)
    return pack_model(q).eval(), x


def _integer_attention_calls(model: nn.Module, x: torch.Tensor) -> int:
    """torch.export the model; the exported program must give the eager packed output. Returns the
    number of dfqkern::matmul_int calls in its graph."""
    ep = torch.export.export(model, (x,))
    with torch.inference_mode():
        assert torch.equal(ep.module()(x), model(x))
    return sum(n.target is torch.ops.dfqkern.matmul_int.default for n in ep.graph.nodes)


@pytest.mark.parametrize("variant,cfg", [("qkv", {}), ("mha", {"attn_granularity": "per_head"}),
                                         ("qkv", {"act_granularity": "per_token"})], ids=["qkv", "mha_head", "token"])
def test_packed_vit_attention_exports_on_the_integer_op(variant, cfg):
    """The packed attention's codes and matmuls are custom ops with fake implementations: torch.export
    records them (q.k^T and two attn.v matmuls per block), and the program computes what eager does."""
    model, x = _packed_vit(variant, **cfg)
    assert _integer_attention_calls(model, x[:2]) == 3 * 2


@pytest.mark.slow
def test_packed_vit_runs_in_a_fresh_process(tmp_path):
    """The tiny ViT through AOTInductor: the integer attention ops are called back in the loading process."""
    model, x = _packed_vit("qkv")
    _check_roundtrip(tmp_path, model, x[:2], [x[:1], x[2:5]])


# ----------------------------------------------------------------------------- errors (no compile)

@pytest.fixture(scope="module")
def packed_digits():
    return _packed("digits_cnn", QuantConfig(weight_observer="minmax", act_observer="minmax"))


def test_refuses_models_that_are_not_packed(tmp_path):
    x = (torch.randn(2, 1, 8, 8),)
    with pytest.raises(ValueError, match="needs a packed model.*no dfqkern quantized layers"):
        export_pt2(create_model("digits_cnn"), tmp_path / "m.pt2", x)
    q = quantize_model(create_model("digits_cnn"), QuantConfig(weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(4, 1, 8, 8), progress=False)
    with pytest.raises(ValueError, match=r"fake-quant \(unpacked\) layers: features\.0"):
        export_pt2(q, tmp_path / "m.pt2", x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        export_pt2(lambda t: t, tmp_path / "m.pt2", x)
    assert list(tmp_path.iterdir()) == []


def test_bad_paths_and_inputs_fail_before_export(tmp_path, packed_digits, monkeypatch):
    def exported(*a, **k):
        raise AssertionError("torch.export ran before the arguments were checked")

    monkeypatch.setattr(torch.export, "export", exported)
    x = (torch.randn(2, 1, 8, 8),)
    with pytest.raises(ValueError, match=r"out_path .*m\.onnx.* must end in '\.pt2'"):
        export_pt2(packed_digits, tmp_path / "m.onnx", x)
    with pytest.raises(FileNotFoundError, match="out_path .*does not exist"):
        export_pt2(packed_digits, tmp_path / "nope" / "m.pt2", x)
    (tmp_path / "d.pt2").mkdir()
    with pytest.raises(ValueError, match="out_path .*is a directory"):
        export_pt2(packed_digits, tmp_path / "d.pt2", x)
    (tmp_path / "old.pt2").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="out_path .*exists; pass overwrite=True"):
        export_pt2(packed_digits, tmp_path / "old.pt2", x)
    assert (tmp_path / "old.pt2").read_bytes() == b"old"
    with pytest.raises(TypeError, match="example_inputs must be a non-empty tuple of tensors"):
        export_pt2(packed_digits, tmp_path / "m.pt2", [x[0]])
    with pytest.raises(ValueError, match="batch dimension of at least 2"):
        export_pt2(packed_digits, tmp_path / "m.pt2", (torch.randn(1, 1, 8, 8),))


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pt2 package .*missing\.pt2.* does not exist"):
        load_pt2(tmp_path / "missing.pt2")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        load_pt2(tmp_path)
    (tmp_path / "junk.pt2").write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match=r"pt2 package .*junk\.pt2.* cannot be loaded"):
        load_pt2(tmp_path / "junk.pt2")


def test_failed_compile_leaves_no_file(tmp_path, packed_digits, monkeypatch):
    def broken(*a, **k):
        Path(k["package_path"]).write_bytes(b"half")
        raise RuntimeError("compiler died")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", broken)
    with pytest.raises(RuntimeError, match="compiler died"):
        export_pt2(packed_digits, tmp_path / "m.pt2", (torch.randn(2, 1, 8, 8),))
    assert list(tmp_path.iterdir()) == []


class _DataDependent(nn.Module):
    """Stands in for a packed module that calls kernels directly: a branch on a value export cannot trace."""
    is_packed = True

    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_packed_module_is_named(tmp_path, packed_digits):
    model = nn.Sequential(packed_digits, _DataDependent())
    with pytest.raises(RuntimeError, match=r"torch\.export could not trace the packed model \(.*the likely cause: "
                                           r"1 \(_DataDependent\)\)"):
        export_pt2(model, tmp_path / "m.pt2", (torch.randn(2, 1, 8, 8),))
    assert list(tmp_path.iterdir()) == []
