import json

import pytest
import torch

from dfqkern.datagen import diffusion as D
from dfqkern.datagen import prompts as P
from dfqkern.datagen.store import MANIFEST, load_synthetic
from synthetic_writes import watch_writes

GEN = dict(steps=2, guidance_scale=5.0, progress=False)


@pytest.fixture(scope="session")
def mixup_set(tiny_pipeline, tmp_path_factory):
    """A mixup set of 8 images, 2 steps, batches of 4, two shards."""
    out = tmp_path_factory.mktemp("mixup_set")
    D.generate_diffusion_set(out, tiny_pipeline, classes="cifar10", num_images=8, prompt_mode="mixup",
                             mixup_k=2, weights="dirichlet", seed=7, batch_size=4, shard_size=4,
                             output_size=12, **GEN)
    return out


def test_mixup_set_manifest(mixup_set):
    m = json.loads((mixup_set / MANIFEST).read_text())
    names = P.class_names("cifar10")
    assert m["source"] == "diffusion" and m["num_images"] == 8 and m["class_names"] == names
    assert m["generator"]["library"] == "diffusers" and m["generator"]["id"].endswith("pipeline")
    assert m["config"]["prompt_mode"] == "mixup" and m["config"]["mixup_k"] == 2 and m["config"]["seed"] == 7
    seeds = [e["seed"] for e in m["images"]]
    assert len(set(seeds)) == 8 and seeds == [P.image_seed(7, i) for i in range(8)]
    for e in m["images"]:
        assert len(e["class_names"]) == 2 and len(set(e["classes"])) == 2
        assert e["class_names"] == [names[c] for c in e["classes"]]
        assert all(n in e["prompt"] for n in e["class_names"])
        assert abs(sum(e["weights"]) - 1) < 1e-9
    ds = load_synthetic(mixup_set)
    x, y = ds[0]
    assert x.shape == (3, 12, 12) and 0 <= x.min() and x.max() <= 1
    assert torch.isclose(y.sum(), torch.tensor(1.0)) and (y > 0).sum() == 2
    assert (mixup_set / "samples.png").exists()
    assert x.std() > 0.01  # a real decoded image, not a constant


def test_regenerate_one_image_alone(tiny_pipeline, mixup_set, tmp_path):
    ds = load_synthetic(mixup_set)
    # Batch of 1 vs the original batch of 4: equal up to float batching effects (<= 1 level).
    again = D.regenerate_images(tiny_pipeline, ds, [5])[0]
    stored = ds.image_uint8(5)
    diff = (again.int() - stored.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02
    other = ds.image_uint8(4)
    assert (again.int() - other.int()).abs().max() > 10  # a different image is really different
    # Same batch composition (batch_size=1 both times): bit-identical.
    D.generate_diffusion_set(tmp_path, tiny_pipeline, classes="cifar10", num_images=3, seed=2, batch_size=1,
                             output_size=12, **GEN)
    one = load_synthetic(tmp_path)
    assert torch.equal(D.regenerate_images(tiny_pipeline, one, [2])[0], one.image_uint8(2))


def test_kill_and_resume_equals_uninterrupted(tiny_pipeline, tmp_path, monkeypatch):
    kw = dict(classes="cifar10", num_images=8, prompt_mode="mixup", mixup_k=2, seed=11, batch_size=1,
              shard_size=4, **GEN)
    D.generate_diffusion_set(tmp_path / "ref", tiny_pipeline, **kw)
    written = watch_writes(monkeypatch, kill_when=lambda index, written: len(written) == 5)
    with pytest.raises(KeyboardInterrupt):
        D.generate_diffusion_set(tmp_path / "run", tiny_pipeline, **kw)
    run = tmp_path / "run"
    assert not (run / MANIFEST).exists()
    assert (run / "shard_00000" / "shard.json").exists() and not (run / "shard_00001" / "shard.json").exists()
    assert written == [0, 1, 2, 3, 4]

    resumed = watch_writes(monkeypatch)
    D.generate_diffusion_set(run, tiny_pipeline, **kw)
    assert resumed == [5, 6, 7]  # only the missing images were generated
    ref = json.loads((tmp_path / "ref" / MANIFEST).read_text())
    got = json.loads((run / MANIFEST).read_text())
    assert got == ref  # same entries, same image hashes
    resumed.clear()
    D.generate_diffusion_set(run, tiny_pipeline, **kw)  # complete: nothing to do
    assert resumed == []


def test_other_config_refused_then_overwritten(tiny_pipeline, tmp_path):
    D.generate_diffusion_set(tmp_path, tiny_pipeline, classes="cifar10", num_images=2, seed=0, **GEN)
    with pytest.raises(ValueError, match="different configuration.*steps"):
        D.generate_diffusion_set(tmp_path, tiny_pipeline, classes="cifar10", num_images=2, seed=0,
                                 steps=3, progress=False)
    D.generate_diffusion_set(tmp_path, tiny_pipeline, classes="cifar10", num_images=2, seed=0, steps=3,
                             progress=False, guidance_scale=5.0, overwrite=True)
    assert load_synthetic(tmp_path).manifest["config"]["steps"] == 3


def test_resume_by_directory_with_loaded_pipeline(tiny_pipeline, tiny_pipeline_dir, tmp_path):
    # Started from the directory, continued with the already loaded pipeline: one and the same config.
    kw = dict(classes="cifar10", num_images=2, seed=0, shard_size=1, batch_size=1, **GEN)
    D.generate_diffusion_set(tmp_path, str(tiny_pipeline_dir), device="cpu", **kw)
    m = load_synthetic(tmp_path).manifest
    assert m["config"]["scheduler"] == "DDIMScheduler" and m["config"]["dtype"] == "float32"
    (tmp_path / "shard_00001" / "shard.json").unlink()
    (tmp_path / "shard_00001" / "00000001.png").unlink()
    D.generate_diffusion_set(tmp_path, tiny_pipeline, **kw)
    assert load_synthetic(tmp_path).manifest == m
    with pytest.raises(ValueError, match="scheduler applies when the pipeline is loaded by id"):
        D.generate_diffusion_set(tmp_path, tiny_pipeline, scheduler="ddim", **kw)


def test_embedding_level_mixup_generation(tiny_pipeline, tmp_path):
    D.generate_diffusion_set(tmp_path, tiny_pipeline, classes="cifar10", num_images=2, prompt_mode="mixup",
                             mixup_level="embedding", weights="dirichlet", negative_prompt="blurry", seed=1,
                             batch_size=1, **GEN)
    ds = load_synthetic(tmp_path)
    e = ds.entries[0]
    assert len(e["class_texts"]) == 2 and ds[0][0].shape == (3, 16, 16)
    rec = D.records_from_manifest(ds.manifest)[0]
    gen = dict(steps=2, guidance_scale=5.0, negative_prompt="blurry", output="float")
    mixed = D.generate_images(tiny_pipeline, [rec], **gen)
    assert torch.equal(D.resize_center_crop(mixed, None).mul(255).round().to(torch.uint8)[0], ds.image_uint8(0))
    text_rec = P.PromptRecord(index=0, text=rec.class_texts[0], classes=rec.classes[:1], weights=(1.0,),
                              template=0, seed=rec.seed)
    plain = D.generate_images(tiny_pipeline, [text_rec], **gen)
    # Same seed, plain text prompt of one of the classes: a different image, so the mix was used
    # (a random tiny UNet follows its text only weakly: compare floats, far above rounding noise) ...
    assert (plain - mixed).abs().max() > 1e-3
    # ... and weights (1, 0) reproduce the text path exactly: embeddings are wired like the pipeline's own.
    one_hot = P.PromptRecord(index=0, text="", classes=rec.classes, weights=(1.0, 0.0), template=0, seed=rec.seed,
                             mode="mixup", class_texts=rec.class_texts)
    assert torch.equal(D.generate_images(tiny_pipeline, [one_hot], **gen), plain)


def test_generate_images_outputs(tiny_pipeline):
    recs = P.build_prompts(["cat", "dog"], 2, "single", seed=0)
    u8 = D.generate_images(tiny_pipeline, recs, steps=1, output_size=(8, 12))
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 8, 12)
    f = D.generate_images(tiny_pipeline, recs, steps=1, output="float", guidance_scale=1.0)
    assert f.dtype == torch.float32 and f.shape == (2, 3, 16, 16) and 0 <= f.min() and f.max() <= 1
    with pytest.raises(ValueError, match="steps must be"):
        D.generate_images(tiny_pipeline, recs, steps=0)
    with pytest.raises(ValueError, match="output must be one of"):
        D.generate_images(tiny_pipeline, recs, steps=1, output="pil")
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        D.generate_images(tiny_pipeline, recs, steps=1, height=20)
    with pytest.raises(TypeError, match="PromptRecord"):
        D.generate_images(tiny_pipeline, ["a cat"], steps=1)


def test_load_pipeline_errors(tmp_path, monkeypatch, tiny_pipeline_dir):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(D.PipelineUnavailableError, match="no_such_pipeline.*no such directory"):
        D.load_pipeline(missing, device="cpu")
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(D.PipelineUnavailableError, match="not_a_pipeline.*not available"):
        D.load_pipeline(tmp_path / "not_a_pipeline", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.PipelineUnavailableError, match="dfqkern-test/no-such-model.*offline"):
        D.load_pipeline("dfqkern-test/no-such-model", device="cpu")
    with pytest.raises(ValueError, match="scheduler must be one of"):
        D.load_pipeline(tiny_pipeline_dir, device="cpu", scheduler="warp-drive")


def test_load_pipeline_scheduler_and_dtype(tiny_pipeline_dir):
    pipe = D.load_pipeline(tiny_pipeline_dir, device="cpu", scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert getattr(pipe, "safety_checker", None) is None
    info = D.pipeline_info(pipe)
    assert info["class"] == "StableDiffusionPipeline" and info["scheduler"] == "EulerDiscreteScheduler"


def test_shard_records_and_ranks(monkeypatch):
    records = list(range(11))
    parts = [D.shard_records(records, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == records
    assert all(set(a).isdisjoint(b) for i, a in enumerate(parts) for b in parts[i + 1:])
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for var in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert D.dist_info() == (0, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert D.dist_info() == (2, 4) and D.shard_records(list(range(8))) == [4, 5]
    with pytest.raises(ValueError, match="rank must be"):
        D.shard_records(records, 3, 3)


def test_two_ranks_fill_one_set(tiny_pipeline, tmp_path):
    kw = dict(classes="cifar10", num_images=4, seed=5, shard_size=2, batch_size=1, **GEN)
    D.generate_diffusion_set(tmp_path, tiny_pipeline, rank=1, world_size=2, **kw)
    assert not (tmp_path / MANIFEST).exists()  # rank 0's shard is still missing
    assert (tmp_path / "shard_00001" / "shard.json").exists() and not (tmp_path / "shard_00000").exists()
    D.generate_diffusion_set(tmp_path, tiny_pipeline, rank=0, world_size=2, **kw)
    assert len(load_synthetic(tmp_path)) == 4


def test_resize_center_crop():
    x = torch.zeros(1, 3, 20, 40)
    x[..., :, 6:34] = 1.0  # bright centre band, wider than the crop
    y = D.resize_center_crop(x, 10)
    assert y.shape == (1, 3, 10, 10)
    assert y.min() > 0.9  # the centre crop keeps the bright middle
    assert D.resize_center_crop(x, None) is x
    with pytest.raises(ValueError, match="output_size"):
        D.resize_center_crop(x, 0)


def test_cli_generate_diffusion_keeps_the_config_defaults(tiny_pipeline_dir, tmp_path, capsys):
    """``dfqkern generate --source diffusion``: given flags land in the record, the others are
    DiffusionConfig's defaults."""
    from dfqkern import cli
    from dfqkern.datagen import DiffusionConfig

    rc = cli.main(["generate", "--source", "diffusion", "--pipeline", str(tiny_pipeline_dir), "--classes", "cifar10",
                   "--num-images", "2", "--steps", "1", "--output-size", "8", "--device", "cpu", "--out",
                   str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    cfg = load_synthetic(tmp_path).manifest["config"]
    assert cfg["steps"] == 1 and cfg["output_size"] == [8, 8] and cfg["classes"] == "cifar10"
    assert DiffusionConfig.from_dict(cfg) == DiffusionConfig(steps=1, output_size=8)
