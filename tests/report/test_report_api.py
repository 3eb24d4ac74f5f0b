"""``dfqkern.report`` through its API on a tiny run: the numbers in report.json and the markdown tables
checked against values computed here independently, the figures, the HTML embedding, atomic writes."""
from __future__ import annotations

import base64
import io
import json
import math
import re

import pytest
import torch

import dfqkern
from dfqkern.report import ReportJob, write_report

from report_run import CLASS_NAMES, LABELS

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double()
    return 10 * math.log10(float(ref.pow(2).sum()) / float((ref - test).pow(2).sum()))


def folded_weight(fp, conv: str, bn: str) -> torch.Tensor:
    c, b = fp.get_submodule(conv), fp.get_submodule(bn)
    return c.weight * (b.weight / torch.sqrt(b.running_var + b.eps)).reshape(-1, 1, 1, 1)


def md_table(md: str, heading: str, section: str) -> dict[str, list[str]]:
    """Rows (first cell -> cells) of the first table after ``### heading`` inside ``## section``."""
    part = md.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    lines = part.split(f"### {heading}\n", 1)[1].splitlines()
    rows = [ln for ln in lines if ln.startswith("| ")]
    start = lines.index(rows[0])
    rows = [ln for ln in lines[start:] if ln.startswith("|")]
    table = []
    for ln in rows:
        if not ln.startswith("| "):
            continue
        if table and ln.split(" | ")[0] == "| " + table[0][0]:
            break
        table.append([c.strip() for c in ln.strip("|").split(" | ")])
    return {r[0]: r for r in table[1:]}


def png_ok(data: bytes) -> tuple[int, int]:
    from PIL import Image

    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as im:
        im.verify()
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    pytest.importorskip("matplotlib")  # the report extra; tests/report/test_report_cli.py covers its absence
    out = tmp_path_factory.mktemp("out") / "report"
    write_report(ReportJob(run=tiny_run["run"], out=out, float_model=tiny_run["fp"], float_label="digits (test)",
                           calib_images=tiny_run["images"], num_calib=12))
    return {"out": out, "json": json.loads((out / "report.json").read_text()), "md": (out / "report.md").read_text(),
            "html": (out / "report.html").read_text()}


def _run(report, name):
    return next(r for r in report["json"]["runs"] if r["name"] == name)


def test_weight_sqnr_matches_an_independent_computation(report, tiny_run):
    """features.3 (4-bit, BatchNorm features.4 folded into it): the packed weight against the folded float
    weight, here from the fake-quant model the checkpoint was packed from and BN folded by hand."""
    expected = sqnr(folded_weight(tiny_run["fp"], "features.3", "features.4"),
                    tiny_run["q4"].get_submodule("features.3").quant_weight().detach())
    layers = {r["name"]: r for r in _run(report, "ck_w4a8")["layers"]}
    assert layers["features.3"]["weight_bits"] == 4
    assert layers["features.3"]["weight_sqnr_db"] == pytest.approx(expected, abs=0.01)
    row = md_table(report["md"], "ck_w4a8 (w4a8)", "Per-layer quantization error (SQNR)")["features.3"]
    assert float(row[5]) == pytest.approx(expected, abs=0.006)
    fc = tiny_run["fp"].fc.weight  # no BatchNorm before the classifier: the float weight itself
    assert layers["fc"]["weight_sqnr_db"] == pytest.approx(
        sqnr(fc, tiny_run["q4"].fc.quant_weight().detach()), abs=0.01)


def test_more_bits_give_higher_sqnr(report):
    w4 = {r["name"]: r for r in _run(report, "ck_w4a8")["layers"]}
    w8 = {r["name"]: r for r in _run(report, "ck_w8a8")["layers"]}
    assert [w4[n]["weight_bits"] for n in ("features.0", "features.3", "features.7", "fc")] == [8, 4, 4, 8]
    assert min(w4["features.0"]["weight_sqnr_db"], w4["fc"]["weight_sqnr_db"]) > \
        max(w4["features.3"]["weight_sqnr_db"], w4["features.7"]["weight_sqnr_db"]) + 10  # ~6 dB per bit
    for name in ("features.3", "features.7"):  # the same layer at 8 bits in the other checkpoint
        assert w8[name]["weight_sqnr_db"] > w4[name]["weight_sqnr_db"] + 10
        assert w8[name]["output_sqnr_db"] > w4[name]["output_sqnr_db"]
    assert list(w4) == ["features.0", "features.3", "features.7", "fc"]  # model order, not config.json's


def test_output_sqnr_ranges_and_logits_match_the_models(report, tiny_run):
    x = tiny_run["images"]
    packed = dfqkern.load_quantized(tiny_run["ck4"])
    fp = tiny_run["fp"]
    got = {}
    h1 = fp.features[1].register_forward_hook(lambda m, a, o: got.__setitem__("ref", o.clone()))
    h2 = packed.features[0].register_forward_hook(lambda m, a, o: got.__setitem__("q", o.clone()))
    with torch.no_grad():
        ref_logits, logits = fp(x), packed(x)
    h1.remove(), h2.remove()
    run = _run(report, "ck_w4a8")
    layers = {r["name"]: r for r in run["layers"]}
    assert layers["features.0"]["output_sqnr_db"] == pytest.approx(sqnr(got["ref"], got["q"]), abs=0.01)
    assert run["probe"]["images"] == len(x)
    assert run["probe"]["logits_sqnr_db"] == pytest.approx(sqnr(ref_logits, logits), abs=0.01)
    agree = 100.0 * float((ref_logits.argmax(1) == logits.argmax(1)).float().mean())
    assert run["probe"]["top1_agreement"] == pytest.approx(agree)
    ranges = {r["name"]: r for r in run["activation_ranges"]}
    aq = tiny_run["q4"].get_submodule("features.3").a_quant
    scale, zp = float(aq.scale), int(aq.zero_point)
    assert ranges["features.3.a_quant"]["low"] == pytest.approx(-zp * scale)
    assert ranges["features.3.a_quant"]["high"] == pytest.approx((255 - zp) * scale)
    first = ranges["features.0.a_quant"]  # the first layer's input is the images themselves
    aq0 = tiny_run["q4"].features[0].a_quant
    assert int(aq0.zero_point) > 0 and first["low"] == pytest.approx(-int(aq0.zero_point) * float(aq0.scale))
    assert (first["seen_low"], first["seen_high"]) == pytest.approx((float(x.min()), float(x.max())))
    row = md_table(report["md"], "ck_w4a8 (w4a8)", "Activation ranges")["features.3.a_quant"]
    assert float(row[4]) == pytest.approx((255 - zp) * scale, rel=1e-3)


def test_synthetic_labels_and_figures(report):
    md, out = report["md"], report["out"]
    rows = re.findall(r"^\| (\d+) \| (\S+) \| (.*) \|$", md.split("## Synthetic calibration samples", 1)[1], re.M)
    assert [int(r[0]) for r in rows] == list(range(len(LABELS)))
    for (classes, weights), row in zip(LABELS, rows):
        assert row[2] == ", ".join(f"{CLASS_NAMES[c]} {w:.2f}" for c, w in zip(classes, weights))  # by class name
    syn = report["json"]["synthetic"]
    assert syn["num_images"] == len(LABELS) and syn["samples"][0]["labels"] == [["three", 0.6], ["seven", 0.4]]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["act_ranges_ck_w4a8.png", "act_ranges_ck_w8a8.png", "samples.png", "sqnr.png"]
    for name in pngs:
        w, h = png_ok((out / name).read_bytes())
        assert w > 100 and h > 100
        assert f"]({name})" in md  # linked from the markdown


def test_html_embeds_every_figure(report):
    html, out = report["html"], report["out"]
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    files = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files.values())
    assert 'src="' not in html.replace('src="data:image/png;base64,', "")  # nothing linked: one file is the report
    assert "<td>features.3</td>" in html and "<h2>Accuracy</h2>" in html


def test_report_json_is_strict_json(report):
    text = (report["out"] / "report.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


def test_without_a_float_model_sqnr_is_not_available(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    out = write_report(ReportJob(run=tiny_run["ck4"], out=tmp_path / "r", format="md", synthetic=False))
    md = (out / "report.md").read_text()
    assert "SQNR not available" in md and not (out / "sqnr.png").exists() and not (out / "report.html").exists()
    row = md_table(md, "ck_w4a8 (w4a8)", "Per-layer quantization error (SQNR)")["features.3"]
    assert row[5:] == ["n/a", "n/a"]
    assert "No synthetic set" in md
    rec = json.loads((out / "report.json").read_text())
    assert rec["runs"][0]["layers"][0]["weight_sqnr_db"] is None and rec["synthetic"] is None


def test_summary_accuracy_and_float_mismatch(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    summary = {"out": str(tiny_run["ck8"]), "method": "observer", "fp_top1": 91.25, "quant_top1": 90.5, "drop": 0.75}
    out = write_report(ReportJob(run=tiny_run["run"], out=tmp_path / "r", format="md", summaries=[summary]))
    acc = md_table((out / "report.md").read_text().replace("## Accuracy\n", "## Accuracy\n### x\n"), "x", "Accuracy")
    assert list(acc) == ["ck_w8a8"] and acc["ck_w8a8"][2:6] == ["observer", "91.25", "90.50", "0.75"]
    with pytest.raises(ValueError, match="summary \\(--summary\\).*none of the checkpoints"):
        ReportJob(run=tiny_run["run"], out=tmp_path / "r2", summaries=[{**summary, "out": str(tmp_path)}])
    from dfqkern.models import create_model

    with pytest.raises(ValueError, match=r"float_model \(--model / --checkpoint\) does not match checkpoint "
                                         r".*layer .fc. is a Linear"):
        write_report(ReportJob(run=tiny_run["ck4"], out=tmp_path / "r3", float_model=create_model("cifar10_resnet20")))
    assert not (tmp_path / "r3").exists()


def test_write_is_atomic(tiny_run, tmp_path, monkeypatch):
    """A failure while writing leaves neither a report nor a temporary directory; an earlier report in
    --out stays as it was until a new one replaces it whole."""
    pytest.importorskip("matplotlib")
    from dfqkern.report import render

    out = tmp_path / "r"
    write_report(ReportJob(run=tiny_run["ck4"], out=out, format="md", synthetic=False))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(render, "to_html", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(ReportJob(run=tiny_run["ck4"], out=out, overwrite=True, synthetic=False))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary directory, no lock file left
    monkeypatch.undo()
    write_report(ReportJob(run=tiny_run["ck4"], out=out, overwrite=True, format="html", synthetic=False))
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json"]  # replaced whole


def test_probe_survives_an_in_place_activation():
    """A ReLU(inplace=True) after the folded BatchNorm rewrites the tensor the float reference's hook saw;
    the probe must compare the layer's output as it was."""
    from torch import nn

    from dfqkern.report.probe import probe
    from dfqkern.report.sqnr import folded_reference

    torch.manual_seed(0)
    fp = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.Flatten(),
                       nn.Linear(8 * 6 * 6, 4)).eval()
    with torch.no_grad():
        fp[1].running_mean.uniform_(-0.5, 0.5)
    x = torch.randn(6, 3, 6, 6)
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=4, act_bits=8, first_last_bits=None))
    dfqkern.calibrate_activations(q, x, progress=False)
    dfqkern.pack_model(q)
    got = {}
    h1 = fp[1].register_forward_hook(lambda m, a, o: got.__setitem__("ref", o.clone()))
    h2 = q[0].register_forward_hook(lambda m, a, o: got.__setitem__("q", o.clone()))
    with torch.no_grad():
        fp(x), q(x)
    h1.remove(), h2.remove()
    result = probe(q, x, folded_reference(fp)[0])
    assert result.output_sqnr_db["0"] == pytest.approx(sqnr(got["ref"], got["q"]), abs=0.01)


def test_attention_layers_without_a_float_counterpart(tmp_path):
    """nn.MultiheadAttention keeps q / k / v in one in_proj_weight: the swapped q_proj / k_proj / v_proj get no
    SQNR (said in a note), the other layers theirs; per-head and fixed (softmax) quantizers get ranges."""
    pytest.importorskip("matplotlib")
    from dfqkern.models import create_model

    torch.manual_seed(0)
    fp = create_model("cifar10_vit_mha")
    x = torch.randn(4, 3, 32, 32)
    q = dfqkern.quantize_model(fp, dfqkern.QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                       act_observer="minmax", attn_granularity="per_head"))
    dfqkern.calibrate_activations(q, x, progress=False)
    ck = dfqkern.save_quantized(q, tmp_path / "vit")
    out = write_report(ReportJob(run=ck, out=tmp_path / "r", format="md", float_model=fp, calib_images=x))
    run = json.loads((out / "report.json").read_text())["runs"][0]
    layers = {r["name"]: r for r in run["layers"]}
    assert layers["blocks.layers.0.self_attn.k_proj"]["weight_sqnr_db"] is None
    assert layers["blocks.layers.0.self_attn.out_proj"]["weight_sqnr_db"] == pytest.approx(
        sqnr(fp.get_submodule("blocks.layers.0.self_attn.out_proj").weight,
             q.get_submodule("blocks.layers.0.self_attn.out_proj").quant_weight()), abs=0.01)
    assert layers["blocks.layers.0.linear1"]["output_sqnr_db"] > 10
    assert any("no float counterpart" in n for n in run["notes"])
    kinds = {r["name"].rpartition(".")[2]: r["kind"] for r in run["activation_ranges"] if ".self_attn." in r["name"]}
    assert kinds["k_quant"] == "per-head" and kinds["attn_quant"] == "fixed"
