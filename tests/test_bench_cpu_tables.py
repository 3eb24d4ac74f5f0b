"""The CPU latency table (bench/conftest.py) compares rows at one ISA: a dfqkern row forced to AVX2 is set
against the peers forced to AVX2 in a child process (bench/forced_peers.py), never against a peer that
ran at the machine's best ISA. Synthetic rows; nothing is timed."""
from __future__ import annotations

import pytest
from test_bench_tables import _bench_module

GROUP = "linear 197x768->3072"


@pytest.fixture(scope="module")
def conftest():
    return _bench_module("conftest")


def _row(row, role, median, minimum, isa=None, forced=False, **extra):
    out = dict(row=row, role=role, median=median, min=minimum, **extra)
    if isa is not None:
        out.update(isa=isa, forced=forced)
    return out


def _cells(lines, row):
    line = next(x for x in lines if x.startswith(f"| {row} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def _ratio(ref, row):
    return f"{ref[0] / row[0]:.2f} / {ref[1] / row[1]:.2f}"


FBGEMM_VNNI, FBGEMM_AVX2, OURS_AVX2, OURS_VNNI = (1000, 950), (2600, 2500), (2800, 2750), (900, 840)


def _vnni_machine_rows(with_forced_peers=True):
    rows = [_row("fbgemm int8 dynamic", "baseline", *FBGEMM_VNNI, "avx512vnni", primary=True),
            _row("fp32 F.linear", "baseline", 3800, 3700, "avx512vnni"),
            _row("onnxruntime MatMulNBits W4 block 128 int8", "baseline", 3000, 2900, "avx512vnni"),
            _row("dfqkern W4A8", "dfqkern", *OURS_VNNI, "avx512vnni"),
            _row("dfqkern W4A8 [avx2]", "dfqkern", *OURS_AVX2, "avx2", forced=True),
            _row("dfqkern W4A8 [avx512vnni]", "dfqkern", *OURS_VNNI, "avx512vnni", forced=True)]
    if with_forced_peers:  # what the child process forced to AVX2 reports
        rows += [_row("fbgemm int8 dynamic [avx2]", "baseline", *FBGEMM_AVX2, "avx2", forced=True, primary=True),
                 _row("fp32 F.linear [avx2]", "baseline", 5000, 4900, "avx2", forced=True)]
    return rows


def test_avx2_rows_are_compared_with_the_avx2_forced_peers(conftest):
    lines = conftest._table({GROUP: _vnni_machine_rows()})
    assert "| row | ISA | median us | min us | speed-up vs fbgemm int8 dynamic at the row's ISA" in "\n".join(lines)
    ours = _cells(lines, "dfqkern W4A8 [avx2]")
    assert ours[1] == "avx2 (forced)"
    assert ours[4] == _ratio(FBGEMM_AVX2, OURS_AVX2)  # 0.93 / 0.91 ...
    assert ours[4] != _ratio(FBGEMM_VNNI, OURS_AVX2)  # ... not 0.36 / 0.35 against fbgemm's VNNI kernels
    assert _cells(lines, "dfqkern W4A8 [avx512vnni]")[4] == _ratio(FBGEMM_VNNI, OURS_VNNI)
    assert _cells(lines, "dfqkern W4A8")[1:2] == ["avx512vnni (auto)"]
    assert _cells(lines, "dfqkern W4A8")[4] == _ratio(FBGEMM_VNNI, OURS_VNNI)  # own choice against own choice
    assert _cells(lines, "fp32 F.linear [avx2]")[4] == _ratio(FBGEMM_AVX2, (5000, 4900))
    assert _cells(lines, "fbgemm int8 dynamic [avx2]")[1] == "avx2 (forced)"
    assert _cells(lines, "fbgemm int8 dynamic")[1] == "avx512vnni (own choice)"
    assert _cells(lines, "onnxruntime MatMulNBits W4 block 128 int8")[1] == "avx512vnni (own choice; cannot be forced)"
    verdict = next(x for x in lines if x.startswith(f"- {GROUP} / dfqkern W4A8 [avx2]:"))
    assert "over fbgemm int8 dynamic [avx2] 0.93 (median), 0.91 (min); target >= 1.0: MISSED" in verdict


def test_without_avx2_peers_an_avx2_row_gets_no_ratio(conftest):
    """The child skipped or failed: the AVX2 row is left unjudged rather than compared with VNNI peers."""
    lines = conftest._table({GROUP: _vnni_machine_rows(with_forced_peers=False)})
    assert _cells(lines, "dfqkern W4A8 [avx2]")[4] == ""
    verdict = next(x for x in lines if x.startswith(f"- {GROUP} / dfqkern W4A8 [avx2]:"))
    assert verdict.endswith("no fbgemm int8 dynamic row at avx2 (not measured at that ISA in this run); not judged")
    assert _cells(lines, "dfqkern W4A8 [avx512vnni]")[4] == _ratio(FBGEMM_VNNI, OURS_VNNI)


def test_unforceable_peer_targets_are_not_judged_at_avx2(conftest):
    group = "linear M=1 K=N=4096"
    rows = [dict(r, wbits=4) if r["role"] == "dfqkern" else r for r in _vnni_machine_rows()]
    rows.append(_row("memory floor W4 (copy 8 MiB / 2)", "floor", 300, 290, wbits=4))
    lines = conftest._table({group: rows})
    onnx = [x for x in lines if x.startswith(f"- {group} / ") and "onnxruntime" in x]
    avx2 = [x for x in onnx if "dfqkern W4A8 [avx2]:" in x]
    assert len(avx2) == 1 and "not judged" in avx2[0] and "MLAS" in avx2[0]
    assert any("dfqkern W4A8 [avx512vnni]: speed-up over onnxruntime MatMulNBits W4" in x for x in onnx)
    assert _cells(lines, "memory floor W4 (copy 8 MiB / 2)")[1] == ""  # the floor has no ISA


def test_on_an_avx2_only_machine_the_peers_own_choice_is_avx2(conftest):
    rows = [_row("fbgemm int8 dynamic", "baseline", *FBGEMM_AVX2, "avx2", primary=True),
            _row("onnxruntime MatMulNBits W4 block 128 int8", "baseline", 3000, 2900, "avx2"),
            _row("dfqkern W4A8", "dfqkern", *OURS_AVX2, "avx2"),
            _row("dfqkern W4A8 [avx2]", "dfqkern", *OURS_AVX2, "avx2", forced=True)]
    lines = conftest._table({GROUP: rows})
    assert _cells(lines, "dfqkern W4A8 [avx2]")[4] == _cells(lines, "dfqkern W4A8")[4] == _ratio(FBGEMM_AVX2,
                                                                                                  OURS_AVX2)


def test_rows_without_isa_keep_the_plain_table(conftest):
    """The GPU suites record no ISA: no ISA column, ratios against the primary baseline as before."""
    lines = conftest._table({"gpu gemm": [_row("torch fp16", "baseline", 100, 90, primary=True),
                                          _row("dfqkern W4A16", "dfqkern", 50, 45)]})
    header = "| row | median us | min us | speed-up vs torch fp16 (median / min) | x memory floor (median / min) |"
    assert header in lines
    assert _cells(lines, "dfqkern W4A16") == ["dfqkern W4A16", "50", "45", "2.00 / 2.00", ""]


def test_peer_levels_to_force():
    machine, peers = _bench_module("machine"), _bench_module("forced_peers")
    assert machine.best_isa({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}) == "avx512vnni"
    assert machine.best_isa({"avx2", "avx512f", "avx512bw", "avx512dq", "avx512vl"}) == "avx512"
    assert machine.best_isa({"avx2", "fma"}) == "avx2"
    assert peers.levels_to_force(["avx512vnni", "avx2"], "avx512vnni") == ["avx2"]
    assert peers.levels_to_force(["avx2"], "avx512") == ["avx2"]  # Skylake-SP: fbgemm would pick AVX-512
    assert peers.levels_to_force(["avx2"], "avx2") == []  # AVX2-only: the peers are there already
    assert peers.unforceable("onnxruntime int8 QDQ static") and peers.unforceable("fbgemm int8 dynamic") is None


class _Report:
    def __init__(self, nodeid, when, outcome, longrepr=None):
        self.nodeid, self.when, self.longrepr = nodeid, when, longrepr
        self.passed, self.failed, self.skipped = (outcome == o for o in ("passed", "failed", "skipped"))


def test_child_outcomes_reach_the_parent(tmp_path):
    """The child's report (bench/forced_peers.ChildReport) drives the parent's forced rows: a timed pass adds the
    row to the table, a skip or failure there is one here, and a test the child never ran fails."""
    from types import SimpleNamespace

    peers = _bench_module("forced_peers")
    report = peers.ChildReport(str(tmp_path / "report.json"))
    ok, skip, bad = (f"bench/test_bench_cpu.py::test_x[{n}-forced-avx2]" for n in ("ok", "skip", "bad"))
    report.pytest_runtest_logreport(_Report(ok, "call", "passed"))
    report.pytest_runtest_logreport(_Report(skip, "setup", "skipped", ("f.py", 1, "Skipped: no int4pack op")))
    report.pytest_runtest_logreport(_Report(bad, "call", "passed"))
    report.pytest_runtest_logreport(_Report(bad, "teardown", "failed", "boom in teardown"))
    bench = SimpleNamespace(extra_info={"row": "fbgemm int8 dynamic [avx2]", "role": "baseline"}, group=GROUP,
                            fullname=ok, stats=SimpleNamespace(rounds=5, median=2e-3, min=1e-3))
    report.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace(_benchmarksession=SimpleNamespace(
        benchmarks=[bench]))))
    child = __import__("json").loads((tmp_path / "report.json").read_text())
    child.update(returncode=1, output="tail", env=peers.FORCE_ENV["avx2"])

    config = SimpleNamespace(stash=pytest.Stash())
    config.stash[peers._CHILDREN] = {"avx2": child}  # as if the child had run

    def request(nodeid):
        return SimpleNamespace(session=SimpleNamespace(config=config), config=config,
                               node=SimpleNamespace(nodeid=nodeid))

    peers.record_child_row(request(ok), "avx2", 2)
    assert config.stash[peers.ROWS] == [("test_bench_cpu", dict(bench.extra_info, group=GROUP, median=2000.0,
                                                                  min=1000.0))]
    with pytest.raises(pytest.skip.Exception, match="no int4pack op"):
        peers.record_child_row(request(skip), "avx2", 2)
    with pytest.raises(pytest.fail.Exception, match="boom in teardown"):
        peers.record_child_row(request(bad), "avx2", 2)
    with pytest.raises(pytest.fail.Exception, match="did not run"):
        peers.record_child_row(request("bench/test_bench_cpu.py::test_x[never-forced-avx2]"), "avx2", 2)
    assert len(config.stash[peers.ROWS]) == 1


def test_compiled_model_row_is_judged_against_fp32_and_onnxruntime_int8(conftest):
    """The whole-model targets (bench/conftest.py TARGETS, 'dfqkern W4A8 packed' rows) judge the compiled row as
    well as the eager packed one: against fp32 eager (primary) and onnxruntime int8 QDQ, on minima."""
    group = "model CIFAR ResNet-20 b1"
    fp32, qdq, eager, compiled = (1800, 1700), (1200, 1000), (1250, 1150), (1100, 950)
    rows = [_row("fp32 eager", "baseline", *fp32, "avx2", primary=True),
            _row("onnxruntime int8 QDQ static", "baseline", *qdq, "avx2"),
            _row("dfqkern W4A8 packed", "dfqkern", *eager, "avx2"),
            _row("dfqkern W4A8 packed compiled", "dfqkern", *compiled, "avx2")]
    lines = conftest._table({group: rows})
    assert _cells(lines, "dfqkern W4A8 packed compiled")[4] == _ratio(fp32, compiled)
    verdicts = [x for x in lines if x.startswith(f"- {group} / dfqkern W4A8 packed compiled:")]
    assert verdicts == [
        f"- {group} / dfqkern W4A8 packed compiled: speed-up over fp32 eager {fp32[0] / compiled[0]:.2f} (median), "
        f"{fp32[1] / compiled[1]:.2f} (min); target >= 1.0: met",
        f"- {group} / dfqkern W4A8 packed compiled: speed-up over onnxruntime int8 QDQ static "
        f"{qdq[0] / compiled[0]:.2f} (median), {qdq[1] / compiled[1]:.2f} (min); target >= 1.0: met"]
    eager_vs_qdq = next(x for x in lines if x.startswith(f"- {group} / dfqkern W4A8 packed: speed-up over onnx"))
    assert eager_vs_qdq.endswith("target >= 1.0: MISSED")  # 1000 / 1150 on minima: the verdict reads each row


def test_onnxruntime_int8_peer_runs_every_conv_in_int8(tmp_path):
    """The 'onnxruntime int8 QDQ static' whole-model row is onnxruntime's int8 path, not fp32 convs between Q/DQ:
    a random-init conv net whose folded BatchNorms give identical zero biases (the exporter then shares them
    through Identity nodes, which quantize_static alone leaves unquantized: no QLinearConv at all) comes out of
    bench/test_bench_cpu.py's onnxruntime flow with every Conv fused into a QLinearConv."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch
    from torch import nn

    ort_int8 = _bench_module("ort_int8")
    torch.manual_seed(0)
    layers = []
    for cin in (3, 8, 8):
        layers += [nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(1, 3, 16, 16)
    model = ort_int8.float_onnx(net, x)
    sess, int8, convs = ort_int8.quantize_int8(model, torch.randn(4, 3, 16, 16), tmp_path, 1)
    assert (int8, convs) == (3, 3)
    assert sess.run(None, {"x": x.numpy()})[0].shape == (1, 8, 16, 16)
