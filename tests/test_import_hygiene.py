"""``import dfqkern`` stays light: no triton / diffusers / timm / transformers, no CUDA initialisation,
and it works with those packages (and the compiled extension) absent. Each check runs in a fresh
interpreter so nothing imported by other tests can hide a regression."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("triton", "diffusers", "timm", "transformers")
MODULES = ("dfqkern", "dfqkern.config", "dfqkern.formats", "dfqkern.kernels", "dfqkern.autograd", "dfqkern.nn",
           "dfqkern.quantize", "dfqkern.io", "dfqkern.cli", "dfqkern.models", "dfqkern.data", "dfqkern.pipeline",
           "dfqkern.evaluation", "dfqkern.demo", "dfqkern.runtime", "dfqkern.export")

REPORT = (
    "import json, sys, torch\n"
    "print('@@' + json.dumps({'heavy': sorted(n for n in %r if sys.modules.get(n) is not None),\n"
    "                          'cuda_initialized': torch.cuda.is_initialized()}))\n" % (HEAVY,)
)


def run_python(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    env.pop("DFQKERN_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-4000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("@@"))
    return json.loads(line[2:])


def hide(names) -> str:
    """A -c prelude that makes ``import NAME`` raise ImportError for each name."""
    return "import sys\n" + "".join(f"sys.modules[{n!r}] = None\n" for n in names)


def test_import_imports_nothing_heavy_and_leaves_cuda_alone():
    code = "".join(f"import {m}\n" for m in MODULES) + REPORT
    assert run_python(code) == {"heavy": [], "cuda_initialized": False}


# Calling any torch.library.custom_op eagerly makes torch import torch._dynamo, which imports triton when
# it is installed (torch/_compile.py -> torch/utils/_triton.py): outside dfqkern's control, so the runtime
# checks below allow triton once a forward has run, and still require the others to stay out.
TORCH_RUNTIME = {"heavy": ["triton"], "cuda_initialized": False}


def test_cpu_quantize_pack_forward_stays_light():
    """The whole CPU path (quantize, calibrate, pack, packed forward, save, load) needs no diffusers / timm /
    transformers and never initialises CUDA."""
    code = (
        "import tempfile, torch\n"
        "from dfqkern.config import QuantConfig\n"
        "from dfqkern.models import create_model\n"
        "from dfqkern.quantize import quantize_model, calibrate_activations, pack_model\n"
        "from dfqkern.io import save_quantized, load_quantized\n"
        "m = create_model('digits_cnn')\n"
        "q = quantize_model(m, QuantConfig(weight_observer='minmax', act_observer='minmax'))\n"
        "calibrate_activations(q, torch.randn(8, 1, 8, 8), progress=False)\n"
        "pack_model(q)\n"
        "x = torch.randn(2, 1, 8, 8)\n"
        "y = q(x)\n"
        "d = tempfile.mkdtemp()\n"
        "assert torch.equal(load_quantized(save_quantized(q, d + '/ck'))(x), y)\n"
    ) + REPORT
    assert run_python(code) in ({"heavy": [], "cuda_initialized": False}, TORCH_RUNTIME)


def test_works_with_optional_packages_absent():
    code = hide(HEAVY) + "".join(f"import {m}\n" for m in MODULES) + (
        "import torch\n"
        "from dfqkern.kernels import available_backends\n"
        "names = available_backends()\n"
        "assert 'reference' in names and 'triton' not in names, names\n"
        "from dfqkern.models import create_model\n"
        "from dfqkern.quantize import quantize_model, calibrate_activations, pack_model\n"
        "q = quantize_model(create_model('cifar10_resnet20'), QuantConfig(weight_observer='minmax', "
        "act_observer='minmax'))\n"
        "calibrate_activations(q, torch.randn(2, 3, 32, 32), progress=False)\n"
        "pack_model(q)(torch.randn(1, 3, 32, 32))\n"
        "try:\n"
        "    create_model('timm:resnet18')\n"
        "except ImportError as e:\n"
        "    assert 'pip install timm' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('timm model built without timm')\n"
    ).replace("import torch\n", "import torch\nfrom dfqkern.config import QuantConfig\n", 1) + REPORT
    assert run_python(code) == {"heavy": [], "cuda_initialized": False}


def test_works_without_compiled_extension():
    code = hide(["dfqkern._C"]) + (
        "import torch, dfqkern, dfqkern.nn, dfqkern.quantize, dfqkern.io, dfqkern.cli\n"
        "from dfqkern.kernels import available_backends\n"
        "names = available_backends()\n"
        "assert names[0] == 'reference' and 'cpu' not in names and 'cuda' not in names, names\n"
        "from torch import nn\n"
        "from dfqkern.config import QuantConfig\n"
        "from dfqkern.quantize import quantize_model, calibrate_activations, pack_model\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))\n"
        "q = quantize_model(m, QuantConfig(weight_observer='minmax', act_observer='minmax'))\n"
        "calibrate_activations(q, torch.randn(4, 3, 6, 6), progress=False)\n"
        "pack_model(q)(torch.randn(2, 3, 6, 6))\n"
    ) + REPORT
    assert run_python(code) in ({"heavy": [], "cuda_initialized": False}, TORCH_RUNTIME)


@pytest.mark.parametrize("name", HEAVY)
def test_prelude_really_hides(name):
    """The hiding prelude used above does make the import fail (so those tests can fail)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", hide([name]) + f"import {name}\n"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode != 0 and f"import of {name} halted; None in sys.modules" in r.stderr


# ----------------------------------------------------------------------------- import direction

PACKAGE = REPO / "dfqkern"


def _dfqkern_imports(path: Path):
    """(imported module as a dotted dfqkern name, imported names) for every import in ``path``."""
    import ast

    pkg = path.relative_to(REPO).with_suffix("").parts[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[:len(pkg) - node.level + 1]) if node.level else []
            yield ".".join(base + (node.module.split(".") if node.module else [])), [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_data_and_models_do_not_import_each_other():
    for a, b in (("data", "models"), ("models", "data")):
        imported = {m for m, _ in _dfqkern_imports(PACKAGE / f"{a}.py")}
        assert f"dfqkern.{b}" not in imported, f"dfqkern/{a}.py imports dfqkern.{b}"


def test_no_private_cross_module_imports():
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for module, names in _dfqkern_imports(path):
            for name in names:
                if module.startswith("dfqkern") and name.startswith("_") and not name.startswith("__") and name != "_C":
                    found.add((path.relative_to(PACKAGE).as_posix(), name))
    assert not found, sorted(found)


def test_version_is_typed_once():
    import re

    import dfqkern
    from dfqkern import _version

    assert dfqkern.__version__ == _version.__version__
    literal = re.compile(r"""["']\d+\.\d+\.\d+["']""")
    for f in ("setup.py", "dfqkern/__init__.py", "dfqkern/io.py", "dfqkern/datagen/store.py", "dfqkern/cli.py"):
        assert not literal.search((REPO / f).read_text()), f"{f} types a version string"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'attr = "dfqkern._version.__version__"' in pyproject
