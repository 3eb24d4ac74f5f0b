"""``dfqkern bench`` (dfqkern.benchmark): latency / memory of a packed checkpoint against its float model."""
from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from dfqkern import benchmark, cli
from dfqkern.config import QuantConfig
from dfqkern.io import load_quantized, save_quantized
from dfqkern.models import create_model
from dfqkern.quantize import calibrate_activations, pack_model, quantize_model
from cli_helpers import run_cli

SLEEP_S = 0.5  # a first call this slow must never reach the statistics



@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    """A packed W4A8 digits CNN checkpoint (random weights), built like tests/test_cli.py's."""
    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn"), QuantConfig(weight_observer="minmax", act_observer="minmax"))
    calibrate_activations(q, torch.randn(8, 1, 8, 8), progress=False)
    return save_quantized(pack_model(q), tmp_path_factory.mktemp("bench") / "digits_w4a8")


def _nbytes(model):
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def test_bench_cli_table_and_json(digits_ckpt, tmp_path, capsys):
    rc, out, err = run_cli(capsys, "bench", digits_ckpt, "--batch-sizes", "1,3", "--repeats", 4, "--warmup", 2,
                           "--threads", 1, "--json-out", tmp_path / "b.json")
    assert rc == 0, err
    assert "dfqkern bench" in err  # the progress bar
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["arch"] == "digits_cnn" and res["scheme"] == "w4a8" and res["device"] == "cpu"
    assert res["threads"] == 1 and res["warmup"] == 2 and res["repeats"] == 4 and res["batch_sizes"] == [1, 3]
    assert res["input_size"] == [1, 8, 8] and res["mem_method"]
    rows = {(r["model"], r["batch_size"]): r for r in res["rows"]}
    assert sorted(rows) == [("float", 1), ("float", 3), ("packed", 1), ("packed", 3)]
    packed_bytes, float_bytes = _nbytes(load_quantized(digits_ckpt)), _nbytes(create_model("digits_cnn"))
    for (kind, b), r in rows.items():
        assert 0 < r["min_ms"] <= r["median_ms"] and r["first_call_ms"] > 0 and r["repeats"] == 4
        assert r["model_bytes"] == (packed_bytes if kind == "packed" else float_bytes)
        assert r["peak_mem_bytes"] is None or r["peak_mem_bytes"] >= 0
        assert r["speedup_vs_float"] == pytest.approx(rows[("float", b)]["median_ms"] / r["median_ms"])
        # the printed table carries the same numbers
        assert f"{kind:12} {b:>5} {r['median_ms']:10.3f} {r['min_ms']:9.3f}" in out
    assert packed_bytes < float_bytes / 2  # mostly 4-bit codes against fp32
    if sys.platform.startswith("linux"):
        assert "VmHWM" in res["mem_method"] and all(isinstance(r["peak_mem_bytes"], int) for r in res["rows"])


def test_measure_excludes_the_first_call():
    calls = []

    def fn():
        calls.append(1)
        if len(calls) == 1:
            time.sleep(SLEEP_S)

    t = benchmark.measure(fn, warmup=2, repeats=5)
    assert len(calls) == 7 and len(t.times_s) == 5
    assert t.first_call_s >= SLEEP_S and max(t.times_s) < SLEEP_S
    assert t.min_ms <= t.median_ms
    with pytest.raises(ValueError, match="warmup and repeats must be >= 1"):
        benchmark.measure(fn, warmup=0, repeats=5)


def test_bench_cli_never_times_a_slow_first_forward(digits_ckpt, tmp_path, capsys, monkeypatch):
    """The packed model's first forward sleeps (a first-call cost): the CLI reports it as first_call_ms and
    keeps it out of the statistics. One timed repeat, so a harness that timed the first call would fail."""
    import dfqkern.io

    real_load = dfqkern.io.load_quantized

    def load_with_slow_first_call(*a, **k):
        model = real_load(*a, **k)
        seen = []

        def hook(module, args):
            if not seen:
                seen.append(1)
                time.sleep(SLEEP_S)

        model.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(dfqkern.io, "load_quantized", load_with_slow_first_call)
    rc, _, err = run_cli(capsys, "bench", digits_ckpt, "--float", "none", "--batch-sizes", "1,2", "--repeats", 1,
                         "--warmup", 1, "--quiet", "--json-out", tmp_path / "b.json")
    assert rc == 0, err
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [(r["model"], r["batch_size"]) for r in rows] == [("packed", 1), ("packed", 2)]
    first = rows[0]
    assert first["first_call_ms"] >= 1e3 * SLEEP_S
    assert first["min_ms"] < 1e3 * SLEEP_S and first["median_ms"] < 1e3 * SLEEP_S
    assert rows[1]["first_call_ms"] < 1e3 * SLEEP_S  # only the very first forward slept


def test_demo_latency_uses_the_harness(monkeypatch):
    from dfqkern.demo import LATENCY_REPEATS, LATENCY_WARMUP, batch_latency_ms

    calls, used = [], []
    real_measure = benchmark.measure

    def spy(fn, **kwargs):
        used.append(kwargs)
        return real_measure(fn, **kwargs)

    monkeypatch.setattr(benchmark, "measure", spy)

    class FirstCallSleeps(torch.nn.Module):
        def forward(self, x):
            calls.append(1)
            if len(calls) == 1:
                time.sleep(SLEEP_S)
            return x

    median_ms, min_ms = batch_latency_ms(FirstCallSleeps(), torch.zeros(1))
    assert used == [{"warmup": LATENCY_WARMUP, "repeats": LATENCY_REPEATS}] and LATENCY_WARMUP >= 1
    assert len(calls) == LATENCY_REPEATS + LATENCY_WARMUP
    assert min_ms <= median_ms < 1e3 * SLEEP_S


def _onnx_flatten_matmul(path, features: int, classes: int):
    """A tiny hand-built ONNX model (flatten, matmul) with a free batch dimension."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((features, classes)).astype(np.float32),
                                "w")
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["y"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes])], initializer=[w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_bench_onnx_row(digits_ckpt, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="onnxruntime is an optional extra")
    pytest.importorskip("onnx", reason="onnx is an optional extra")
    _onnx_flatten_matmul(tmp_path / "m.onnx", 64, 10)
    rc, _, err = run_cli(capsys, "bench", digits_ckpt, "--float", "none", "--onnx", tmp_path / "m.onnx",
                         "--batch-sizes", "1,2", "--repeats", 2, "--warmup", 1, "--quiet", "--json-out",
                         tmp_path / "b.json")
    assert rc == 0, err
    rows = {(r["model"], r["batch_size"]): r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert sorted(rows) == [("onnxruntime", 1), ("onnxruntime", 2), ("packed", 1), ("packed", 2)]
    r = rows[("onnxruntime", 2)]
    assert 0 < r["min_ms"] <= r["median_ms"] and r["model_bytes"] == (tmp_path / "m.onnx").stat().st_size
    assert r["max_abs_diff_vs_packed"] > 0  # another model: the check compares outputs, not a constant


@pytest.mark.slow
def test_bench_pt2_row_matches_packed(digits_ckpt, tmp_path, capsys):
    """A package exported from the checkpoint is timed beside it and gives its logits (one AOTI compile)."""
    from dfqkern.export.pt2 import export_pt2

    package = export_pt2(load_quantized(digits_ckpt), tmp_path / "m.pt2", (torch.randn(2, 1, 8, 8),))
    rc, out, err = run_cli(capsys, "bench", digits_ckpt, "--pt2", package, "--batch-sizes", "1,4", "--repeats", 3,
                           "--warmup", 1, "--quiet", "--json-out", tmp_path / "b.json")
    assert rc == 0, err
    rows = {(r["model"], r["batch_size"]): r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    for b in (1, 4):
        assert rows[("pt2", b)]["max_abs_diff_vs_packed"] <= 1e-5  # tolerance: see tests/export/test_export_pt2.py
        assert rows[("pt2", b)]["min_ms"] <= rows[("pt2", b)]["median_ms"]
    assert "pt2" in out


# ----------------------------------------------------------------------------- argument errors

@pytest.fixture
def no_model_load(monkeypatch):
    import dfqkern.io

    def loaded(*a, **k):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(dfqkern.io, "load_quantized", loaded)


@pytest.mark.parametrize("sizes", ["1,x", "0", "2,2", "", "-1"])
def test_bad_batch_sizes_name_the_argument(digits_ckpt, capsys, no_model_load, sizes):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", str(digits_ckpt), "--batch-sizes", sizes])
    assert e.value.code == 2
    assert "argument --batch-sizes" in capsys.readouterr().err


@pytest.mark.parametrize("extra,needle", [
    (["--repeats", "0"], "--repeats"), (["--warmup", "0"], "--warmup"), (["--threads", "0"], "--threads"),
    (["--device", "tpu"], "--device"), (["--pt2", "missing.pt2"], "--pt2 'missing.pt2' is not a file"),
])
def test_bad_options_name_the_argument(digits_ckpt, capsys, no_model_load, extra, needle):
    rc, _, err = run_cli(capsys, "bench", digits_ckpt, *extra)
    assert rc == 2 and needle in err and err.count("\n") == 1, err


def test_missing_checkpoint_and_bad_json_out(tmp_path, digits_ckpt, capsys, no_model_load):
    rc, _, err = run_cli(capsys, "bench", tmp_path / "nope")
    assert rc == 2 and "CHECKPOINT_DIR" in err and "nope" in err
    rc, _, err = run_cli(capsys, "bench", digits_ckpt, "--json-out", tmp_path)
    assert rc == 2 and "--json-out" in err and "is a directory" in err


def test_onnx_without_onnxruntime_is_a_clear_error(tmp_path, digits_ckpt, capsys, no_model_load, monkeypatch):
    (tmp_path / "m.onnx").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    rc, _, err = run_cli(capsys, "bench", digits_ckpt, "--onnx", tmp_path / "m.onnx")
    assert rc == 2 and "--onnx needs onnxruntime" in err


# ----------------------------------------------------------------------------- --compile

def test_bench_compiled_row_matches_packed(digits_ckpt, tmp_path, capsys, monkeypatch):
    """--compile times dfqkern.compile(packed) beside the packed model: the same kernels in the same order give
    the packed logits exactly; the row runs the captured graph (the root module is never called through
    nn.Module.__call__), not the eager model under another name."""
    import dfqkern.io

    real_load, root_calls = dfqkern.io.load_quantized, []

    def load_counting_root_calls(*a, **k):
        model = real_load(*a, **k)
        model.register_forward_pre_hook(lambda module, args: root_calls.append(args[0].shape[0]))
        return model

    monkeypatch.setattr(dfqkern.io, "load_quantized", load_counting_root_calls)
    rc, out, err = run_cli(capsys, "bench", digits_ckpt, "--compile", "--batch-sizes", "1,3", "--repeats", 3,
                           "--warmup", 2, "--threads", 1, "--quiet", "--json-out", tmp_path / "b.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "b.json").read_text())
    rows = {(r["model"], r["batch_size"]): r for r in res["rows"]}
    assert [r["model"] for r in res["rows"]] == ["packed", "packed", benchmark.COMPILED, benchmark.COMPILED,
                                                 "float", "float"]
    # the packed row: first call + 1 more warm-up + 3 repeats, + 1 reference call, per batch size; none compiled
    assert root_calls == [1] * 6 + [3] * 6
    width = len(benchmark.COMPILED)
    for b in (1, 3):
        r = rows[(benchmark.COMPILED, b)]
        assert r["source"] == f"dfqkern.compile({benchmark.COMPILED_MODE})" and r["repeats"] == 3 and "error" not in r
        assert r["max_abs_diff_vs_packed"] == 0.0
        assert r["model_bytes"] == rows[("packed", b)]["model_bytes"]
        assert 0 < r["min_ms"] <= r["median_ms"]
        assert r["speedup_vs_float"] == pytest.approx(rows[("float", b)]["median_ms"] / r["median_ms"])
        for kind in ("packed", benchmark.COMPILED, "float"):  # one column width for every row
            x = rows[(kind, b)]
            assert f"\n{kind:{width}} {b:>5} {x['median_ms']:10.3f} {x['min_ms']:9.3f}" in out
    assert "max_abs_diff_vs_packed" not in rows[("float", 1)]


def test_bench_compile_failure_is_a_row(digits_ckpt, tmp_path, capsys, monkeypatch):
    """A model torch.fx cannot trace: the compiled row records why; the packed row is timed as usual."""
    from torch.fx.proxy import TraceError

    import dfqkern.runtime_compile

    def untraceable(self, root, *a, **k):
        raise TraceError("symbolically traced variables cannot be used as inputs to control flow")

    monkeypatch.setattr(dfqkern.runtime_compile._Tracer, "trace", untraceable)
    rc, out, err = run_cli(capsys, "bench", digits_ckpt, "--compile", "--float", "none", "--batch-sizes", "1,2",
                           "--repeats", 1, "--warmup", 1, "--quiet", "--json-out", tmp_path / "b.json")
    assert rc == 0, err
    rows = {(r["model"], r["batch_size"]): r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert sorted(rows) == [("packed", 1), ("packed", 2), (benchmark.COMPILED, 1), (benchmark.COMPILED, 2)]
    assert "median_ms" in rows[("packed", 2)]
    for b in (1, 2):
        r = rows[(benchmark.COMPILED, b)]
        assert "median_ms" not in r and "max_abs_diff_vs_packed" not in r
        assert r["error"] == (f"RuntimeError: dfqkern.compile(mode={benchmark.COMPILED_MODE!r}) failed: TraceError: "
                              "symbolically traced variables cannot be used as inputs to control flow")
        assert f"{benchmark.COMPILED} {b:>5}  error: {r['error']}" in out


def test_bench_without_compile_has_no_compiled_row(digits_ckpt):
    res = benchmark.run_bench(digits_ckpt, float_model="none", batch_sizes=(1,), repeats=1, warmup=1, progress=False)
    assert [r["model"] for r in res["rows"]] == ["packed"]
    assert not [line for line in benchmark.format_table(res).splitlines() if line.startswith(benchmark.COMPILED)]
