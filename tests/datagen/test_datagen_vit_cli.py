"""``dfqkern generate --source inversion --method psaq|dfq-vit`` end to end on a random CIFAR ViT whose weights
are saved to a local file (as a user passes a trained one), the patchsim filter from the CLI, and the
errors for a model that does not suit the method or filter."""
from __future__ import annotations

import pytest
import torch

from dfqkern.datagen.store import load_synthetic
from dfqkern.models import create_model
from cli_helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("cifar10_vit_mha")  # nn.TransformerEncoder inside
    path = tmp_path_factory.mktemp("vit") / "vit.pt"
    torch.save(model.state_dict(), path)
    return path


def gen(vit_checkpoint, out, *flags):
    return ["generate", "--source", "inversion", "--model", "cifar10_vit_mha", "--checkpoint", vit_checkpoint,
            "--device", "cpu", "--out", out, "--iters", 2, "--batch-size", 2, *flags]


def test_psaq_set_from_the_cli(vit_checkpoint, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *gen(vit_checkpoint, tmp_path / "s", "--method", "psaq", "--label-mode", "mixup",
                                        "--num-images", 3, "--tv-weight", 2, "--patch-weight", 0.5,
                                        "--kde-bandwidth", 0.1, "--l2-weight", 0.01))
    assert rc == 0, err
    ds = load_synthetic(tmp_path / "s")
    cfg = ds.manifest["config"]
    assert len(ds) == 3 and cfg["method"] == "psaq" and cfg["label_mode"] == "mixup" and cfg["mixup_k"] == 2
    assert ds.manifest["generator"]["id"] == "bn-inversion/psaq" and ds[0][1].count_nonzero() == 2
    assert "psaq: 1 shard(s)" in out
    assert {k: cfg["options"][k] for k in ("tv_weight", "patch_weight", "kde_bandwidth", "l2_weight")} == {
        "tv_weight": 2.0, "patch_weight": 0.5, "kde_bandwidth": 0.1, "l2_weight": 0.01}


def test_a_bad_prior_weight_fails_before_the_model_is_built(vit_checkpoint, tmp_path, capsys):
    rc, _, err = run_cli(capsys, *gen(vit_checkpoint, tmp_path / "s", "--method", "psaq", "--tv-weight", -1))
    assert rc != 0 and "tv_weight" in err and not (tmp_path / "s").exists()


def test_dfq_vit_with_the_patchsim_filter(vit_checkpoint, tmp_path, capsys):
    rc, out, err = run_cli(capsys, *gen(vit_checkpoint, tmp_path / "s", "--method", "dfq-vit", "--num-images", 2,
                                        "--filter", "patchsim:0.5"))
    assert rc == 0, err
    pool, kept = load_synthetic(f"{tmp_path / 's'}.pool"), load_synthetic(tmp_path / "s")
    assert len(pool) == 4 and len(kept) == 2 and pool.manifest["config"]["method"] == "dfq-vit"
    assert [s["kind"] for s in kept.manifest["filter"]["chain"]] == ["patchsim"]
    assert all("patchsim" in e["filter_scores"] for e in kept.manifest["images"])


@pytest.mark.parametrize("flags, match", [
    (["--model", "cifar10_resnet20", "--method", "psaq"], "method 'psaq' needs a vision transformer"),
    (["--model", "cifar10_resnet20", "--method", "dgh", "--filter", "patchsim:0.5"],
     "filter 'patchsim' needs a vision transformer"),
    (["--method", "zeroq"], "no BatchNorm2d layer"),
    (["--method", "psaq", "--num-images", 0], "num_images (--num-images) must be >= 1"),
])
def test_unsuited_model_fails_before_writing(vit_checkpoint, tmp_path, capsys, flags, match):
    argv = gen(vit_checkpoint, tmp_path / "s", *flags)
    if "cifar10_resnet20" in flags:  # the CNN replaces the ViT (and its checkpoint)
        i = argv.index("--model")
        del argv[i:i + 4]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and match in err, err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())
    assert not (tmp_path / "s.pool").exists()


def test_calib_data_spec_generates_a_vit_set(vit_checkpoint, tmp_path):
    from dfqkern.pipeline import load_calibration

    model = create_model("cifar10_vit_mha", checkpoint=vit_checkpoint)
    x = load_calibration("bn-inversion:dfq-vit:mixup", model, 2, seed=0, work_dir=str(tmp_path / "w"), iters=1)
    assert x.shape == (2, 3, 32, 32)
    assert load_synthetic(tmp_path / "w").manifest["config"]["method"] == "dfq-vit"
