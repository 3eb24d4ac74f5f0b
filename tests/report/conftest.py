"""A tiny quantization run for the report tests (see report_run.py for what it is made of)."""
from __future__ import annotations

import pytest
import torch

import dfqkern
from report_run import float_model, quantize, write_synthetic


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """run/ holding ck_w4a8 (first and last layer kept at 8 bits) and ck_w8a8, run/synthetic, the float
    weights file, the probe images, and the fake-quant models the checkpoints were packed from."""
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    fp = float_model()
    images = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q4 = quantize(fp, images, weight_bits=4, act_bits=8)
    q8 = quantize(fp, images, weight_bits=8, act_bits=8)
    ck4 = dfqkern.save_quantized(q4, run / "ck_w4a8")
    ck8 = dfqkern.save_quantized(q8, run / "ck_w8a8")
    syn = write_synthetic(run / "synthetic")
    weights = root / "fp.pt"
    torch.save(fp.state_dict(), weights)
    return {"root": root, "run": run, "fp": fp, "images": images, "q4": q4, "q8": q8, "ck4": ck4, "ck8": ck8,
            "synthetic": syn, "weights": weights}
