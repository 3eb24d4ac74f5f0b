"""One typed record of what dfqkern knows about a model, found through the wrappers users add."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfqkern.config import QuantConfig
from dfqkern.io import load_quantized, save_quantized
from dfqkern.model_info import ModelInfo, model_info, set_info, unwrap
from dfqkern.models import create_model
from dfqkern.quantize import calibrate_activations, quantize_model

FAST = QuantConfig(weight_observer="minmax", act_observer="minmax")


def _quantized(num_classes=None):
    torch.manual_seed(0)
    q = quantize_model(create_model("digits_cnn", num_classes=num_classes), FAST)
    calibrate_activations(q, torch.randn(8, 1, 8, 8), progress=False)
    return q


def test_a_plain_module_has_an_empty_unattached_record():
    m = nn.Linear(2, 2)
    assert model_info(m) == ModelInfo() and "dfqkern_info" not in m.__dict__
    set_info(m, arch="x")
    assert model_info(m).arch == "x" and m.dfqkern_info is model_info(m)
    with pytest.raises(AttributeError, match="no field 'archh'"):
        set_info(m, archh="x")


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "compile_of_data_parallel"])
def test_wrapped_models_keep_their_record_and_save(wrap, tmp_path):
    q = _quantized()
    wrapped = {"compile": lambda m: torch.compile(m),  # lazy: nothing compiles until it is called
               "data_parallel": nn.DataParallel,
               "compile_of_data_parallel": lambda m: torch.compile(nn.DataParallel(m))}[wrap](q)
    assert unwrap(wrapped) is q and model_info(wrapped) is model_info(q)
    assert model_info(wrapped).config == FAST and model_info(wrapped).arch == "digits_cnn"
    loaded = load_quantized(save_quantized(wrapped, tmp_path / "ck"))
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), load_quantized(save_quantized(q, tmp_path / "plain"))(x))


def test_num_classes_given_to_create_model_survives_save_and_load(tmp_path):
    """create_model records num_classes, so a quantized copy rebuilds the same head on load."""
    q = _quantized(num_classes=3)
    assert model_info(q).arch_kwargs == {"num_classes": 3}
    loaded = load_quantized(save_quantized(q, tmp_path / "ck"))
    assert loaded.fc.out_features == 3 and model_info(loaded).arch_kwargs == {"num_classes": 3}


def test_quantize_model_does_not_touch_the_float_models_record():
    fp = create_model("digits_cnn")
    q = quantize_model(fp, FAST)
    assert model_info(fp).config is None and model_info(q).config == FAST
    assert model_info(q) is not model_info(fp)
