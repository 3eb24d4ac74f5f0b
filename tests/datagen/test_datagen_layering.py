"""Layer rule: datagen imports neither dfqkern.kernels nor dfqkern.nn, and heavy libraries only
inside functions; plus a CUDA smoke test of the fp16 paths (skipped without a GPU)."""
import ast
import pathlib
import subprocess
import sys

import pytest
import torch

import dfqkern.datagen

DATAGEN = pathlib.Path(dfqkern.datagen.__file__).parent
HEAVY = ("diffusers", "transformers", "timm", "triton", "accelerate")


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node, a.name
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            for a in node.names:
                yield node, f"{base}.{a.name}" if node.module is None else base


@pytest.mark.parametrize("path", sorted(DATAGEN.glob("*.py")), ids=lambda p: p.name)
def test_no_forbidden_imports(path):
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    for node, name in _imports(tree):
        parts = name.lstrip(".").split(".")
        assert not ({"kernels", "nn"} & set(parts[:2]) and (name.startswith("..") or parts[0] == "dfqkern")), \
            f"{path.name} imports {name}: datagen must not depend on dfqkern.kernels or dfqkern.nn"
        if parts[0] in HEAVY:
            assert id(node) not in top_level, f"{path.name} imports {name} at module level; import it lazily"


def test_import_pulls_no_heavy_library():
    code = ("import sys, dfqkern.datagen; "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 pipeline and inversion on device)")
def test_cuda_fp16_paths(tiny_pipeline_dir, tmp_path, tiny_bn_net):
    from dfqkern.datagen import (build_prompts, generate_diffusion_set, generate_images, invert_bn, load_pipeline,
                                 load_synthetic)

    pipe = load_pipeline(tiny_pipeline_dir)  # defaults: CUDA, float16
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16
    recs = build_prompts("cifar10", 3, "mixup", mixup_level="embedding", weights="dirichlet", seed=0)
    a = generate_images(pipe, recs, steps=2, batch_size=3)
    b = generate_images(pipe, recs[1:2], steps=2)
    assert a.dtype == torch.uint8 and a.shape == (3, 3, 16, 16)
    assert (a[1].int() - b[0].int()).abs().max() <= 2  # per-image CPU generators: same noise on any batch
    generate_diffusion_set(tmp_path, pipe, classes="cifar10", num_images=4, steps=2, progress=False)
    assert len(load_synthetic(tmp_path)) == 4
    res = invert_bn(tiny_bn_net.cuda(), 4, "dgh", "mixup", iters=5, batch_size=2, input_shape=(3, 8, 8),
                    progress=False)
    assert res.images.device.type == "cpu" and torch.isfinite(res.images).all()
