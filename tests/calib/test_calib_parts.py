"""The calibration building blocks: config validation, unit discovery, activation store, losses."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfqkern.calib import CalibConfig, block_types, find_units, register_block
from dfqkern.calib.capture import ActivationStore, capture, quantization_disabled
from dfqkern.calib.losses import beta_at, reconstruction_loss, rounding_active
from dfqkern.calib.units import execution_order
from dfqkern.models import CifarBasicBlock

# ----------------------------------------------------------------------------- config


def test_config_defaults_follow_the_literature():
    c = CalibConfig()
    assert (c.method, c.iters, c.batch_size, c.act_lr, c.round_weight) == ("qdrop", 20000, 32, 4e-5, 0.01)
    assert (c.beta_start, c.beta_end, c.warmup, c.effective_drop_prob) == (20.0, 2.0, 0.2, 0.5)
    assert c.effective_round_lr == 1e-3
    assert CalibConfig(iters=2000).effective_round_lr == pytest.approx(1e-2)
    assert CalibConfig(iters=10000).effective_round_lr == pytest.approx(2e-3)
    assert CalibConfig(iters=10, round_lr=5e-4).effective_round_lr == 5e-4
    assert CalibConfig(method="brecq").effective_drop_prob == 0.0
    assert CalibConfig(method="brecq", drop_prob=0.3).effective_drop_prob == 0.3
    traits = {m: (CalibConfig(method=m).blockwise, CalibConfig(method=m).learn_act_scale,
                  CalibConfig(method=m).learn_weight_scale) for m in ("adaround", "brecq", "qdrop", "genie")}
    assert traits == {"adaround": (False, False, False), "brecq": (True, True, False),
                      "qdrop": (True, True, False), "genie": (True, True, True)}


def test_config_round_trips_and_rejects_unknown_fields():
    c = CalibConfig(method="genie", iters=7, checkpoint_dir="/x")
    assert CalibConfig.from_dict(c.to_dict()) == c
    assert "checkpoint_dir" not in c.result_fields() and c.result_fields()["iters"] == 7
    with pytest.raises(ValueError, match="unknown CalibConfig fields"):
        CalibConfig.from_dict({"method": "qdrop", "lr": 1})


@pytest.mark.parametrize("kwargs, name", [
    ({"method": "gptq"}, "method"), ({"iters": 0}, "iters"), ({"iters": 2.5}, "iters"),
    ({"batch_size": -1}, "batch_size"), ({"act_lr": 0}, "act_lr"), ({"round_lr": -1e-3}, "round_lr"),
    ({"round_weight": -0.1}, "round_weight"), ({"warmup": 1.0}, "warmup"), ({"drop_prob": 1.5}, "drop_prob"),
    ({"qdrop_mask": "numpy"}, "qdrop_mask"), ({"observe_samples": 0}, "observe_samples"), ({"seed": -1}, "seed"),
    ({"memory_budget_mb": 0}, "memory_budget_mb"), ({"version": 9}, "version"),
])
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CalibConfig(**kwargs)


# ----------------------------------------------------------------------------- units

def test_find_units_by_type_not_name(tiny_cnn, quantize):
    q = quantize(tiny_cnn)
    units = find_units(q)
    assert [(u.name, u.kind) for u in units] == [("conv1", "layer"), ("layer.0", "block"), ("layer.1", "block"),
                                                 ("fc", "layer")]
    assert [len(u.quant_layers()) for u in units] == [1, 2, 2, 1]
    assert [u.name for u in find_units(q, blockwise=False)] == [
        "conv1", "layer.0.conv1", "layer.0.conv2", "layer.1.conv1", "layer.1.conv2", "fc"]
    assert CifarBasicBlock in block_types()


class _Pair(nn.Module):  # no merge in its forward: a block only once registered
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.b(self.a(x))


def test_register_block_and_execution_order(quantize, monkeypatch):
    from dfqkern.calib import units as units_mod

    monkeypatch.setattr(units_mod, "_USER_BLOCKS", [])  # keep the registration local to this test
    class Reversed(nn.Module):  # registration order differs from execution order
        def __init__(self):
            super().__init__()
            self.late, self.early = nn.Conv2d(3, 3, 1), _Pair()

        def forward(self, x):
            return self.late(self.early(x))

    q = quantize(Reversed(), first_last_bits=None)
    assert [u.name for u in find_units(q)] == ["late", "early.a", "early.b"]
    register_block(_Pair)
    units = find_units(q)
    assert [(u.name, u.kind) for u in units] == [("late", "layer"), ("early", "block")]
    with quantization_disabled(q):  # activation ranges are not observed in this test
        assert [u.name for u in execution_order(q, units, torch.randn(1, 3, 4, 4))] == ["early", "late"]
    with pytest.raises(TypeError, match="cls"):
        register_block(int)


def test_shared_module_is_refused(quantize):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.conv(self.conv(x))

    q = quantize(Shared(), first_last_bits=None)
    with pytest.raises(ValueError, match="more than once"), quantization_disabled(q):
        execution_order(q, find_units(q), torch.randn(1, 3, 4, 4))


def test_library_blocks_are_found_only_once_imported():
    import torchvision  # noqa: F401 - the registry resolves torchvision blocks once the library is loaded
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock, Bottleneck

    assert {BasicBlock, Bottleneck, InvertedResidual} <= set(block_types())


# ----------------------------------------------------------------------------- activation store

@pytest.mark.parametrize("budget", [1e9, 0])
def test_store_rows_in_memory_and_spilled(tmp_path, budget):
    x = torch.randn(37, 3, 5, 2)
    store = ActivationStore(budget, spill_dir=str(tmp_path))
    w = store.create("x", tuple(x.shape))
    for i in range(0, 37, 10):
        w.write(x[i:i + 10])
    w.finish()
    assert store.is_spilled("x") == (budget == 0)
    idx = torch.tensor([36, 0, 5, 5, 17])
    assert torch.equal(store.rows("x", idx), x[idx])
    if budget == 0:  # a valid safetensors file
        from safetensors import safe_open

        with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
            assert torch.equal(f.get_tensor("x"), x)
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_store_budget_splits_between_memory_and_disk():
    store = ActivationStore(budget_bytes=4 * 100 * 10)
    for name in ("a", "b"):
        w = store.create(name, (100, 10))
        w.write(torch.ones(100, 10))
        w.finish()
    assert not store.is_spilled("a") and store.is_spilled("b")
    assert store.used_bytes == 4000
    with pytest.raises(RuntimeError, match="rows"):
        store.create("c", (5, 2)).finish()
    store.close()


def test_capture_stops_after_the_module_and_disabling_gives_float(tiny_cnn, images, quantize):
    from dfqkern.calib import observe_activations
    from dfqkern.nn.observe import batches_of

    q = quantize(tiny_cnn)
    observe_activations(q, batches_of(images, 16), "cpu", progress=False)
    later = []
    q.fc.register_forward_pre_hook(lambda m, a: later.append(1))
    store = ActivationStore(1e9)
    capture(q, q.layer[0], images, 16, store, "in", "out")
    assert later == []  # the forward stopped at the block
    with torch.no_grad():
        stem = q.relu(q.conv1(images))
        torch.testing.assert_close(store.rows("in", torch.arange(64)), stem)
        torch.testing.assert_close(store.rows("out", torch.arange(64)), q.layer[0](stem))
        with quantization_disabled(q):
            torch.testing.assert_close(q(images), tiny_cnn(images), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(q(images), tiny_cnn(images), atol=1e-3)  # re-enabled afterwards


# ----------------------------------------------------------------------------- losses

def test_reconstruction_loss_sums_channels_and_averages_the_rest():
    a, b = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    assert reconstruction_loss(a, b).item() == pytest.approx(((a - b) ** 2).sum(1).mean().item(), rel=1e-6)
    t, u = torch.randn(2, 7, 6), torch.randn(2, 7, 6)  # tokens: channels last
    assert reconstruction_loss(t, u).item() == pytest.approx(((t - u) ** 2).sum(-1).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="shape"):
        reconstruction_loss(a, b[:2])


def test_beta_schedule_and_warmup():
    assert [beta_at(s, 100, 0.2, 20, 2) for s in (0, 19, 20, 60, 100)] == pytest.approx([20, 20, 20, 11, 2])
    assert [rounding_active(s, 100, 0.2) for s in (0, 19, 20, 99)] == [False, False, True, True]
