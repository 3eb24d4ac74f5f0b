"""The lean runtime (issue 20 item 3): ``import dfqkern.runtime`` loads formats, kernels, nn and io only, and a
saved checkpoint loads and runs through it alone. Each check runs in a fresh interpreter.

``import torch`` itself imports tqdm (torch.hub) when tqdm is installed, and running a custom op imports
torch._dynamo (which imports tqdm and triton); neither is dfqkern's doing. So the checks are: nothing on
the forbidden list is imported by dfqkern beyond what ``import torch`` already brought in, dfqkern's own
calibration / generation packages never load, and the runtime works with tqdm (and timm, diffusers,
transformers) made unimportable.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("timm", "diffusers", "transformers", "tqdm")
FORBIDDEN_DFQKERN = ("dfqkern.calib", "dfqkern.datagen", "dfqkern.qat", "dfqkern.pipeline", "dfqkern.demo",
                     "dfqkern.data", "dfqkern.export")


def run_python(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for var in ("TRITON_INTERPRET", "DFQKERN_BACKEND"):
        env.pop(var, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


REPORT = (
    "import json\n"
    "def _loaded(names):\n"
    "    return sorted(n for n in sys.modules if sys.modules[n] is not None\n"
    "                  and any(n == p or n.startswith(p + '.') for p in names))\n"
    "print('@@' + json.dumps({'new': [n for n in _loaded(%r) if n not in base],\n"
    "                          'dfqkern': _loaded(%r)}))\n" % (FORBIDDEN, FORBIDDEN_DFQKERN)
)


def hide(names) -> str:
    return "".join(f"sys.modules[{n!r}] = None\n" for n in names)


def test_import_runtime_pulls_in_nothing_heavy():
    code = "import sys, torch\nbase = set(sys.modules)\nimport dfqkern.runtime\n" + REPORT
    assert run_python(code) == {"new": [], "dfqkern": []}


def test_runtime_exports_what_loading_needs():
    import dfqkern
    import dfqkern.runtime as rt

    assert rt.load_quantized is dfqkern.load_quantized and rt.QuantConv2d is dfqkern.QuantConv2d
    for name in rt.__all__:
        assert getattr(rt, name) is not None
    assert "reference" in rt.available_backends()
    # the public API around it still works (lazy attributes included)
    assert callable(dfqkern.quantize_model) and callable(dfqkern.calibrate) and dfqkern.CalibConfig is not None


def test_checkpoint_loads_and_runs_through_the_runtime_alone(tmp_path):
    import dfqkern
    from dfqkern.models import create_model

    torch.manual_seed(0)
    q = dfqkern.quantize_model(create_model("digits_cnn"),
                               dfqkern.QuantConfig(weight_bits=4, act_bits=8, weight_observer="minmax",
                                                   act_observer="minmax"))
    dfqkern.calibrate_activations(q, torch.randn(16, 1, 8, 8), progress=False)
    ck = dfqkern.save_quantized(dfqkern.pack_model(q), tmp_path / "ck")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.save({"x": x, "y": q(x)}, tmp_path / "io.pt")
    code = (
        "import sys\n" + hide(FORBIDDEN) +  # the runtime must not need them: importing any raises ImportError
        "import torch\nbase = set(sys.modules)\n"
        "from dfqkern.runtime import load_quantized, available_backends\n"
        f"m = load_quantized({str(ck)!r})\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "with torch.no_grad():\n"
        "    y = m(io['x'])\n"
        "assert torch.equal(y, io['y']), (y - io['y']).abs().max()\n"
        "assert 'reference' in available_backends()\n"
    ) + REPORT
    assert run_python(code) == {"new": [], "dfqkern": []}


def test_importing_cli_and_export_does_not_load_exporters():
    """``dfqkern.cli`` (hence the ``dfqkern`` command) and ``dfqkern.export`` load onnx / the exporters only
    when an export runs."""
    code = ("import sys, torch\nbase = set(sys.modules)\nimport dfqkern.cli, dfqkern.export\n"
            "import json\n"
            "print('@@' + json.dumps(sorted(n for n in ('onnx', 'onnxruntime', 'dfqkern.export.onnx', "
            "'dfqkern.export.pt2') if sys.modules.get(n) is not None)))\n")
    assert run_python(code) == []


@pytest.mark.parametrize("name", ["tqdm", "timm"])
def test_hiding_really_hides(name):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", "import sys\n" + hide([name]) + f"import {name}\n"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "halted; None in sys.modules" in r.stderr
