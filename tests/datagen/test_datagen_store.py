import json

import pytest
import torch

from dfqkern.datagen import store as S


def _write_set(root, n=5, channels=3, shard_size=2, seed=0, config=None, meta=None):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 6, 7), generator=g, dtype=torch.uint8)
    entries = [{"classes": [i % 3, (i + 1) % 3], "weights": [0.75, 0.25], "seed": 100 + i} for i in range(n)]
    writer = S.SyntheticSetWriter(root, entries=entries, config=config or {"seed": seed},
                                  meta=meta or {"source": "test", "class_names": ["a", "b", "c"], "num_classes": 3},
                                  channels=channels, shard_size=shard_size)

    def produce(indices):
        for chunk in S.iter_chunks(indices, 2):
            yield chunk, images[chunk]

    assert S.fill_set(writer, produce, progress=False)
    return images


@pytest.mark.parametrize("channels", [1, 3])
def test_roundtrip(tmp_path, channels):
    images = _write_set(tmp_path, channels=channels)
    ds = S.load_synthetic(tmp_path)
    assert len(ds) == 5 and ds.class_names == ["a", "b", "c"] and ds.num_classes == 3
    assert (tmp_path / "shard_00000" / "00000000.png").exists() and (tmp_path / "shard_00002" / "00000004.png").exists()
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (channels, 6, 7)
    assert torch.equal((x * 255).round().to(torch.uint8), images[3])  # PNG is lossless
    torch.testing.assert_close(y, torch.tensor([0.75, 0.25, 0.0]))  # image 3: classes 0, 1
    assert torch.equal(ds.images(), images.float() / 255)
    m = json.loads((tmp_path / S.MANIFEST).read_text())
    from dfqkern import __version__
    assert m["dfqkern_version"] == __version__ and m["format_version"] == S.FORMAT_VERSION
    assert [e["seed"] for e in m["images"]] == [100, 101, 102, 103, 104]
    assert all(len(e["sha256"]) == 64 for e in m["images"])
    assert (tmp_path / S.GRID_FILE).exists()
    from PIL import Image
    with Image.open(tmp_path / S.GRID_FILE) as grid:
        assert grid.size[0] > 7 * 5  # all five images side by side plus padding
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temporaries
    idx = S.load_synthetic(tmp_path, label="index", transform=lambda t: t * 2)
    x2, c = idx[3]
    assert c == 0 and torch.equal(x2, x * 2)


def test_normalize_roundtrip(tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x = torch.randn(4, 3, 5, 5) * 0.3
    unit = S.to_unit_range(x, mean, std)
    assert unit.min() >= 0 and unit.max() <= 1
    _write_set(tmp_path, meta={"source": "t", "num_classes": 3, "normalization": {"mean": mean, "std": std}})
    ds = S.load_synthetic(tmp_path)
    torch.testing.assert_close(ds.normalize(unit), x, atol=1e-5, rtol=0)  # inside [0,1]: no clamping


def test_missing_and_incomplete(tmp_path):
    with pytest.raises(S.SyntheticSetError, match="does not exist"):
        S.load_synthetic(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(S.SyntheticSetError, match="no manifest.json"):
        S.load_synthetic(tmp_path / "empty")
    writer = S.SyntheticSetWriter(tmp_path / "partial", entries=[{"seed": 0}] * 3, config={}, meta={})
    writer.write_image(0, torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(S.SyntheticSetError, match="has not finished.*resume"):
        S.load_synthetic(tmp_path / "partial")
    with pytest.raises(S.SyntheticSetError, match="image .* is missing"):
        writer.finish_shard(0)
    with pytest.raises(S.SyntheticSetError, match="shard 0 is not finished"):
        writer.finalize()


def test_corrupt_manifest(tmp_path):
    _write_set(tmp_path)
    path = tmp_path / S.MANIFEST
    good = path.read_text()
    path.write_text(good[: len(good) // 2])
    with pytest.raises(S.SyntheticSetError, match="corrupt"):
        S.load_synthetic(tmp_path)
    path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(S.SyntheticSetError, match="not a dfqkern synthetic-set manifest"):
        S.load_synthetic(tmp_path)
    m = json.loads(good)
    m["format_version"] = S.FORMAT_VERSION + 1
    path.write_text(json.dumps(m))
    with pytest.raises(S.SyntheticSetError, match="format_version"):
        S.load_synthetic(tmp_path)
    m = json.loads(good)
    m["images"][0]["file"] = "../outside.png"
    path.write_text(json.dumps(m))
    with pytest.raises(S.SyntheticSetError, match="leaves the set directory"):
        S.load_synthetic(tmp_path)


def test_hash_mismatch_and_missing_file(tmp_path):
    _write_set(tmp_path)
    S.load_synthetic(tmp_path)
    victim = tmp_path / "shard_00001" / "00000002.png"
    other = (tmp_path / "shard_00001" / "00000003.png").read_bytes()
    victim.write_bytes(other)  # a valid PNG, but not the one the manifest describes
    with pytest.raises(S.SyntheticSetError, match="00000002.png.*sha256"):
        S.load_synthetic(tmp_path)
    assert len(S.load_synthetic(tmp_path, verify=False)) == 5  # opt-out of hashing
    victim.unlink()
    with pytest.raises(S.SyntheticSetError, match="00000002.png.*missing"):
        S.load_synthetic(tmp_path, verify=False)


def test_resume_refuses_other_config(tmp_path):
    _write_set(tmp_path, config={"seed": 0})
    with pytest.raises(S.SyntheticSetError, match=r"different configuration.*config.seed: 0 -> 1.*overwrite"):
        _write_set(tmp_path, config={"seed": 1}, seed=1)
    (tmp_path / "notes.txt").write_text("user file")
    images = S.SyntheticSetWriter(tmp_path, entries=[{"seed": 9}] * 2, config={"seed": 1}, meta={}, overwrite=True)
    assert not list(tmp_path.glob("shard_*")) and not (tmp_path / S.MANIFEST).exists()
    assert (tmp_path / "notes.txt").exists() and images.num_images == 2  # only the writer's own files go


def test_foreign_directory_refused(tmp_path):
    (tmp_path / S.MANIFEST).write_text("{}")
    with pytest.raises(S.SyntheticSetError, match="different configuration"):
        S.SyntheticSetWriter(tmp_path, entries=[{}], config={}, meta={})


def test_writer_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        S.SyntheticSetWriter(tmp_path, entries=[{}], config={}, meta={}, shard_size=0)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        S.SyntheticSetWriter(tmp_path, entries=[{}], config={}, meta={}, channels=4)
    w = S.SyntheticSetWriter(tmp_path, entries=[{}], config={}, meta={})
    with pytest.raises(ValueError, match="uint8"):
        w.write_image(0, torch.zeros(3, 4, 4))
    with pytest.raises(IndexError):
        w.write_image(1, torch.zeros(3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="label must be one of"):
        S.SyntheticSet(tmp_path, label="hard")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "f.json"
    S.atomic_write_json(target, {"a": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(S.os, "replace", boom)
    with pytest.raises(OSError):
        S.atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


# ----------------------------------------------------------------------------- hardening (issue 15)

def _rehash(root, index, data):
    """Replace image ``index`` by ``data`` and record its sha256, as a regenerated manifest would."""
    m = json.loads((root / S.MANIFEST).read_text())
    (root / m["images"][index]["file"]).write_bytes(data)
    m["images"][index]["sha256"] = S.sha256_bytes(data)
    (root / S.MANIFEST).write_text(json.dumps(m))
    return m["images"][index]["file"]


def test_corrupt_png_names_the_file(tmp_path):
    _write_set(tmp_path)
    name = _rehash(tmp_path, 2, b"\x89PNG\r\n\x1a\n not a png")
    ds = S.load_synthetic(tmp_path)
    with pytest.raises(S.SyntheticSetError, match=rf"{name}.*(corrupt|unreadable)"):
        ds[2]


def test_16bit_png_is_refused_not_clipped(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    _write_set(tmp_path, channels=1)
    buf = io.BytesIO()
    Image.fromarray(np.full((6, 7), 40000, dtype=np.uint16)).save(buf, format="PNG")  # 16-bit grayscale
    name = _rehash(tmp_path, 1, buf.getvalue())
    ds = S.load_synthetic(tmp_path)
    with pytest.raises(S.SyntheticSetError, match=rf"{name}.*8-bit"):
        ds[1]


def test_symlink_out_of_the_set_is_refused(tmp_path):
    root = tmp_path / "set"
    _write_set(root)
    victim = root / "shard_00001" / "00000002.png"
    outside = tmp_path / "outside.png"
    outside.write_bytes(victim.read_bytes())  # same bytes: the sha256 alone cannot tell
    victim.unlink()
    victim.symlink_to(outside)
    with pytest.raises(S.SyntheticSetError, match=r"00000002\.png.*outside the set"):
        S.load_synthetic(root)
    with pytest.raises(S.SyntheticSetError, match=r"00000002\.png.*outside the set"):
        S.load_synthetic(root, verify=False)


def test_run_file_without_images_does_not_block_another_config(tmp_path):
    """A run that failed before writing any image (only ``generation.json``) gives way to a corrected one."""
    S.SyntheticSetWriter(tmp_path, entries=[{"seed": 0}] * 2, config={"ce_weight": -1}, meta={})
    assert (tmp_path / S.RUN_FILE).exists()
    w = S.SyntheticSetWriter(tmp_path, entries=[{"seed": 0}] * 2, config={"ce_weight": 0.5}, meta={})
    assert json.loads((tmp_path / S.RUN_FILE).read_text())["config"] == {"ce_weight": 0.5} and w.num_images == 2
    w.write_image(0, torch.zeros(3, 4, 4, dtype=torch.uint8))  # with an image on disk the refusal stands
    with pytest.raises(S.SyntheticSetError, match="different configuration"):
        S.SyntheticSetWriter(tmp_path, entries=[{"seed": 0}] * 2, config={"ce_weight": 1.0}, meta={})
