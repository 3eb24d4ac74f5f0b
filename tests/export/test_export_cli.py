"""``dfqkern export CHECKPOINT_DIR --format onnx|pt2 --out FILE``: argument checks, the ONNX path end to end
(run in onnxruntime), and the lazy dispatch to dfqkern.export.pt2.export_pt2."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dfqkern
from dfqkern.cli import main
from dfqkern.models import create_model


def _checkpoint(tmp_path, abits: int = 8) -> Path:
    torch.manual_seed(0)
    q = dfqkern.quantize_model(create_model("digits_cnn"),
                               dfqkern.QuantConfig(weight_bits=4, act_bits=abits, weight_observer="minmax",
                                                   act_observer="minmax"))
    dfqkern.calibrate_activations(q, torch.randn(16, 1, 8, 8), progress=False)
    return dfqkern.save_quantized(dfqkern.pack_model(q), tmp_path / f"ck_a{abits}")


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return _checkpoint(tmp_path)


def test_export_onnx_from_checkpoint_runs_in_onnxruntime(ckpt, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dfqkern.export.onnx import onnxruntime_session

    out = tmp_path / "digits.onnx"
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    model = dfqkern.load_quantized(ckpt)
    x = torch.randn(5, 1, 8, 8)  # input shape from the checkpoint's input spec; any batch size
    with torch.no_grad():
        ref = model(x).numpy()
    got = onnxruntime_session(out).run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, ref, atol=0.02 * np.abs(ref).max())
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    # an existing file needs --overwrite; --opset and --input-shape are passed through
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["export", str(ckpt), "--format", "onnx", "--out", str(out)])
    assert main(["export", str(ckpt), "--format", "onnx", "--out", str(out), "--overwrite", "--opset", "17",
                 "--input-shape", "1,8,8"]) == 0
    import onnx

    assert max(i.version for i in onnx.load(str(out)).opset_import if i.domain in ("", "ai.onnx")) == 17


def test_export_argument_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    with pytest.raises(SystemExit) as e:  # argparse usage error
        main(["export", str(ckpt), "--format", "onnx", "--out", out, "--input-shape", "8,8"])
    assert e.value.code == 2 and "--input-shape takes C,H,W" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "--format", "tflite", "--out", out])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match=r"--out .*m\.pt2.* must end in '\.onnx'"):
        main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.pt2")])
    with pytest.raises(SystemExit, match=r"--out .* must end in '\.pt2'"):
        main(["export", str(ckpt), "--format", "pt2", "--out", out])
    with pytest.raises(SystemExit, match="apply to --format onnx only"):
        main(["export", str(ckpt), "--format", "pt2", "--out", str(tmp_path / "m.pt2"), "--opset", "17"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "no" / "m.onnx")])
    assert main(["export", str(tmp_path / "nothing"), "--format", "onnx", "--out", out]) == 2
    assert "is not a directory" in capsys.readouterr().err
    if importlib.util.find_spec("onnx") is not None:
        assert main(["export", str(ckpt), "--format", "onnx", "--out", out, "--opset", "9"]) == 2
        assert "opset must be an int in [13, 21]" in capsys.readouterr().err
    assert not Path(out).exists()


def test_export_a4_checkpoint_names_the_layer(tmp_path, capsys):
    pytest.importorskip("onnx")
    ck = _checkpoint(tmp_path, abits=4)
    out = tmp_path / "a4.onnx"
    assert main(["export", str(ck), "--format", "onnx", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dfqkern export: error:" in err and "layer 'features.3' (w4a4) has 4-bit activations" in err
    assert not out.exists()


def test_missing_onnx_says_what_to_install(ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(SystemExit, match=r"pip install dfqkern\[export\]"):
        main(["export", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])


def test_pt2_dispatches_to_export_pt2(ckpt, tmp_path, monkeypatch, capsys):
    """--format pt2 loads the checkpoint and calls export_pt2(model, out_path, example_inputs) (AOTInductor
    itself is exercised by tests/export/test_export_pt2.py)."""
    pt2 = pytest.importorskip("dfqkern.export.pt2", reason="dfqkern.export.pt2 is not present")
    calls = []

    def fake_export_pt2(model, out_path, example_inputs, **kwargs):
        calls.append((model, Path(out_path), example_inputs, kwargs))
        Path(out_path).write_bytes(b"pt2")
        return Path(out_path)

    monkeypatch.setattr(pt2, "export_pt2", fake_export_pt2)
    out = tmp_path / "m.pt2"
    assert main(["export", str(ckpt), "--format", "pt2", "--out", str(out)]) == 0
    (model, path, inputs, kwargs), = calls
    assert path == out and isinstance(inputs, tuple) and inputs[0].shape == (2, 1, 8, 8)  # batch 2: dynamic
    assert type(model).__name__ == "DigitsCNN" and kwargs == {}
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(ckpt), "--format", "pt2", "--out", str(out), "--overwrite",
                 "--input-shape", "4,1,8,8"]) == 0
    assert calls[1][2][0].shape == (4, 1, 8, 8)
