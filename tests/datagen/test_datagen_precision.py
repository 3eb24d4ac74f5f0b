"""Generation on accelerators, checked on the CPU: autocast precision (bf16 runs, fp16 is refused off
CUDA, the manifest records it), batch size from free memory, SDPA attention in diffusion pipelines."""
import json

import pytest
import torch

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen import diffusion as D
from dfqkern.datagen import resources as R
from dfqkern.datagen.config import AUTO_BATCH_MAX, BNInversionConfig
from dfqkern.datagen.store import MANIFEST, SyntheticSetError

MIB = 2 ** 20
SHAPE = (3, 8, 8)


@pytest.mark.parametrize("method", ["dgh", "zeroq", "genie"])
def test_bf16_autocast_runs_on_cpu_and_lowers_the_bn_loss(tiny_bn_net, method):
    seen = set()
    hook = tiny_bn_net.features[0].register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    x0 = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(0))
    start = B.bn_statistics_loss(tiny_bn_net, x0)
    hook.remove()
    seen.clear()
    tiny_bn_net.features[0].register_forward_hook(lambda m, a, out: seen.add(out.dtype))
    res = B.invert_bn(tiny_bn_net, 8, method, iters=30, batch_size=4, input_shape=SHAPE, precision="bf16",
                      progress=False)
    assert seen == {torch.bfloat16}  # every forward of the inversion ran under bf16 autocast
    assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()
    assert B.bn_statistics_loss(tiny_bn_net, res.images) < 0.8 * start


def test_fp16_is_refused_off_cuda_before_any_work(tiny_bn_net, tmp_path):
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device.*use 'bf16'"):
        B.invert_bn(tiny_bn_net, 4, iters=1, batch_size=2, input_shape=SHAPE, precision="fp16", progress=False)
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        B.generate_bn_inversion_set(tmp_path / "set", tiny_bn_net, num_images=4, input_shape=SHAPE, mean=(0,) * 3,
                                    std=(1,) * 3, precision="fp16", iters=1, batch_size=2, progress=False)
    assert not (tmp_path / "set").exists()
    with pytest.raises(ValueError, match="precision must be one of"):
        BNInversionConfig(precision="fp8")


def test_precision_is_recorded_and_enters_the_resume_check(tiny_bn_net, tmp_path):
    kw = dict(num_images=4, input_shape=SHAPE, mean=(0.5,) * 3, std=(0.25,) * 3, iters=2, batch_size=2,
              progress=False)
    B.generate_bn_inversion_set(tmp_path, tiny_bn_net, precision="bf16", **kw)
    assert json.loads((tmp_path / MANIFEST).read_text())["config"]["precision"] == "bf16"
    with pytest.raises(SyntheticSetError, match="config.precision: 'bf16' -> 'fp32'"):
        B.generate_bn_inversion_set(tmp_path, tiny_bn_net, **kw)
    # A record written before the field existed reads as fp32 (what those sets were made in).
    old = BNInversionConfig().to_dict()
    del old["precision"]
    assert BNInversionConfig().same_record(old) and not BNInversionConfig(precision="bf16").same_record(old)


def test_auto_batch_size_from_free_memory():
    """floor((free * 0.8 - reserved) / per_image), at most AUTO_BATCH_MAX, a multiple of 8 from 8 up."""
    assert R.auto_batch_size(100 * MIB, 3 * MIB) == 24  # 80 / 3 = 26.7 -> 26 -> 24
    assert R.auto_batch_size(100 * MIB, 3 * MIB, reserved_bytes=20 * MIB) == 16  # 60 / 3 = 20 -> 16
    assert R.auto_batch_size(10 * MIB, 3 * MIB) == 2  # 8 / 3 -> 2, below 8: kept
    assert R.auto_batch_size(10 ** 12, 1) == AUTO_BATCH_MAX
    assert R.auto_batch_size(100 * MIB, 3 * MIB, fraction=0.5, multiple=1) == 16  # 50 / 3
    with pytest.raises(ValueError, match="holds 2 image.*fewer than 3; pass a batch size"):
        R.auto_batch_size(10 * MIB, 3 * MIB, minimum=3)
    with pytest.raises(ValueError, match="per_image_bytes > 0"):
        R.auto_batch_size(10 * MIB, 0)


def test_activation_estimate_and_batch_resolution(tiny_bn_net, tmp_path):
    """The tiny net (3x8x8 input): conv/BN/ReLU outputs 8x8x8 (x3), 16x4x4 (x6), 6 logits, kept in
    fp32 (4 bytes) or bf16 (2), doubled for their gradients, plus the image and its gradient."""
    leaf_outputs = 3 * 8 * 8 * 8 + 6 * 16 * 4 * 4 + 6
    for precision, width in (("fp32", 4), ("bf16", 2)):
        expect = leaf_outputs * width * 2 + 2 * 4 * 3 * 8 * 8
        assert R.activation_bytes_per_image(tiny_bn_net, SHAPE, precision) == expect
    # CPU: the documented default; a free-memory figure (as CUDA reports it) gives the rule's answer.
    assert B.resolve_batch_size("auto", model=tiny_bn_net, input_shape=SHAPE, device="cpu") == (
        BNInversionConfig.default("batch_size"), "auto: the CPU default")
    per_image = R.activation_bytes_per_image(tiny_bn_net, SHAPE) + 16 * 3 * 8 * 8
    got, _ = B.resolve_batch_size("auto", model=tiny_bn_net, input_shape=SHAPE, device="cpu", free_bytes=MIB)
    assert got == R.auto_batch_size(MIB, per_image) == int(0.8 * MIB // per_image) // 8 * 8
    assert B.resolve_batch_size(6, model=None, input_shape=SHAPE, device="cpu") == (6, "as given")
    # A set started with some batch size resumes with it, whatever the memory says now.
    B.generate_bn_inversion_set(tmp_path, tiny_bn_net, num_images=4, input_shape=SHAPE, mean=(0,) * 3, std=(1,) * 3,
                                iters=1, batch_size=2, progress=False)
    assert B.resolve_batch_size("auto", model=tiny_bn_net, input_shape=SHAPE, device="cpu", free_bytes=MIB,
                                out_dir=tmp_path)[0] == 2
    B.generate_bn_inversion_set(tmp_path, tiny_bn_net, num_images=4, input_shape=SHAPE, mean=(0,) * 3, std=(1,) * 3,
                                iters=1, batch_size="auto", progress=False)  # resumes: nothing to do


def test_sdpa_replaces_classic_attention_with_the_same_images(tiny_pipeline_dir):
    from diffusers.models.attention_processor import AttnProcessor

    from dfqkern.datagen import build_prompts

    pipe = D.load_pipeline(tiny_pipeline_dir, device="cpu")
    assert D.pipeline_info(pipe)["attention"] == "sdpa"
    pipe.unet.set_attn_processor(AttnProcessor())  # the classic (explicit softmax) processor
    pipe.vae.set_attn_processor(AttnProcessor())
    assert D.pipeline_info(pipe)["attention"] == "classic"
    recs = build_prompts("cifar10", 2, "single", seed=0)
    classic = D.generate_images(pipe, recs, steps=2, output="float")
    assert D.ensure_sdpa(pipe) == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    assert D.pipeline_info(pipe)["attention"] == "sdpa"
    torch.testing.assert_close(D.generate_images(pipe, recs, steps=2, output="float"), classic, atol=1e-4, rtol=0)


def test_diffusion_precision(tiny_pipeline_dir, tmp_path):
    kw = dict(classes="cifar10", num_images=2, steps=1, batch_size="auto", progress=False)
    with pytest.raises(ValueError, match="precision 'fp16' needs a CUDA device"):
        D.generate_diffusion_set(tmp_path / "a", tiny_pipeline_dir, device="cpu", precision="fp16", **kw)
    D.generate_diffusion_set(tmp_path / "b", tiny_pipeline_dir, device="cpu", precision="bf16", **kw)
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest["config"]["dtype"] == "bfloat16" and manifest["generator"]["attention"] == "sdpa"
