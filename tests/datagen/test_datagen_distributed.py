"""Two processes fill one BN-inversion SyntheticSet at the same time (torch.multiprocessing spawn,
torch.distributed gloo on 127.0.0.1): disjoint images, one complete manifest, resume, and dgh's
set-level BN statistics summed over the ranks equal to those one process computes."""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from dfqkern.datagen import bn_inversion as B
from dfqkern.datagen import distributed as DD
from dfqkern.datagen.store import MANIFEST, SHARD_FILE, SyntheticSetWriter, load_synthetic

SHAPE, MEAN, STD = (3, 8, 8), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
DGH = dict(num_images=16, shard_size=8, method="dgh", label_mode="mixup", iters=4, batch_size=2, seed=3)
ZEROQ = dict(num_images=8, shard_size=2, method="zeroq", iters=2, batch_size=2, seed=1)


def _net():
    """conv-BN-ReLU x2 + linear with fixed, non-trivial running statistics (the same in every process)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


def _normalized(images):
    """Stored [0, 1] images back in model-input space, in float64 (so the forward of any batch
    composition gives the same activations to ~1e-16)."""
    m = torch.tensor(MEAN, dtype=torch.float64).reshape(1, -1, 1, 1)
    return (images.double() - m) / torch.tensor(STD, dtype=torch.float64).reshape(1, -1, 1, 1)


def _bn_inputs(model, x):
    """Each BN layer's input for images ``x``, from forward hooks (independent of BNCapture)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().double()))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def _worker(rank, world, port, root, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=__import__("datetime").timedelta(seconds=60))
    written = []
    original = SyntheticSetWriter.write_image

    def record(self, index, image):
        written.append((self.root.name, int(index)))
        return original(self, index, image)

    SyntheticSetWriter.write_image = record
    t0 = time.time()
    for name, kw in (("dgh", DGH), ("zeroq", ZEROQ)):
        model = _net()
        if name == "zeroq" and rank == 1:  # a rank that built other weights (random init) inverts rank 0's
            with torch.no_grad():
                model[-1].weight.add_(1.0)
        B.generate_bn_inversion_set(os.path.join(root, name), model, input_shape=SHAPE, mean=MEAN, std=STD,
                                    progress=False, **kw)
    t1 = time.time()
    # This rank's dgh images (read back from the set), their per-layer sums, summed over the ranks.
    ds = load_synthetic(os.path.join(root, "dgh"))
    mine = sorted(i for name, i in written if name == "dgh")
    zeroq = sorted(i for name, i in written if name == "zeroq")
    sums = []
    for x in _bn_inputs(_net().double(), _normalized(ds.images(mine))):
        sums += [x.sum(dim=(0, 2, 3)), (x * x).sum(dim=(0, 2, 3)), torch.tensor([float(x[:, 0].numel())])]
    reduced = DD.all_reduce_sums(sums)
    # The statistics the optimization uses: SetStatistics over this rank's batches, synchronized.
    model = _net()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(3, *SHAPE, generator=g) for _ in range(5)]  # the same on both ranks
    with B.BNCapture(model) as cap:
        own = []
        for b in DD.split_evenly(len(batches), rank, world):
            with torch.no_grad():
                model(batches[b])
            own.append(cap.moments())
        stats = B.SetStatistics(cap, own, collective=True)
        totals = [[t.tolist() if torch.is_tensor(t) else t for t in layer] for layer in stats.totals]
    # Resume: rank 0 removes what a kill during shard 1 would leave missing; both ranks rerun.
    dist.barrier()
    with open(os.path.join(root, "dgh", MANIFEST)) as f:
        first = [e["sha256"] for e in json.load(f)["images"]]
    dist.barrier()
    if rank == 0:
        dgh = os.path.join(root, "dgh")
        os.remove(os.path.join(dgh, MANIFEST))
        os.remove(os.path.join(dgh, "shard_00001", SHARD_FILE))
        os.remove(os.path.join(dgh, "shard_00001", "00000013.png"))
    dist.barrier()
    written.clear()
    B.generate_bn_inversion_set(os.path.join(root, "dgh"), _net(), input_shape=SHAPE, mean=MEAN, std=STD,
                                progress=False, **DGH)
    with open(os.path.join(results, f"{rank}.json"), "w") as f:
        json.dump({"t": [t0, t1], "mine": mine, "zeroq": zeroq,
                   "resumed": sorted(i for n, i in written), "reduced": [t.tolist() for t in reduced],
                   "totals": totals, "first": first}, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    root, results = tmp_path_factory.mktemp("sets"), tmp_path_factory.mktemp("results")
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(root), str(results)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two-rank generation did not finish within 120 s")
    return root, [json.loads((results / f"{r}.json").read_text()) for r in range(2)]


def test_two_ranks_write_disjoint_parts_of_one_complete_set(two_rank_run):
    root, (r0, r1) = two_rank_run
    assert r0["t"][0] < r1["t"][1] and r1["t"][0] < r0["t"][1]  # the ranks ran at the same time
    for name, kw, parts in (("dgh", DGH, (r0["mine"], r1["mine"])), ("zeroq", ZEROQ, (r0["zeroq"], r1["zeroq"]))):
        assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])  # both worked, no image twice
        assert sorted(parts[0] + parts[1]) == list(range(kw["num_images"]))  # none missing
        manifest = json.loads((root / name / MANIFEST).read_text())
        assert [e["index"] for e in manifest["images"]] == list(range(kw["num_images"]))
        assert manifest["distributed"] == {"world_size": 2, "split_shards": name == "dgh"}
        assert manifest["config"]["precision"] == "fp32"
        assert manifest["config"]["model_sha256"] == B.model_fingerprint(_net())  # rank 0's model, on both
        assert len(load_synthetic(root / name)) == kw["num_images"]  # every file present, hashes match
    # zeroq: whole shards round-robin (rank r owns shards r, r + 2, ...)
    assert r0["zeroq"] == [0, 1, 4, 5] and r1["zeroq"] == [2, 3, 6, 7]
    # dgh: every shard of 8 (4 batches of 2) split by batches: rank 0 the first two, rank 1 the last two
    assert r0["mine"] == [0, 1, 2, 3, 8, 9, 10, 11] and r1["mine"] == [4, 5, 6, 7, 12, 13, 14, 15]


def test_resume_after_a_kill_regenerates_the_same_shard(two_rank_run):
    """Shard 1 lost an image and its shard file: both ranks redo their parts of shard 1 (shard 0 is
    kept), and the images equal those of the uninterrupted run (the first manifest's hashes)."""
    root, (r0, r1) = two_rank_run
    assert r0["resumed"] == [8, 9, 10, 11] and r1["resumed"] == [12, 13, 14, 15]
    manifest = json.loads((root / "dgh" / MANIFEST).read_text())
    assert len(load_synthetic(root / "dgh")) == 16  # every file present, hashes match the new manifest
    assert [e["sha256"] for e in manifest["images"]] == r0["first"] == r1["first"]


def test_all_reduced_statistics_equal_the_single_process_statistics(two_rank_run):
    """Per BN layer l and channel c, over all N images of the set and all positions:
    sum_x = sum x, sum_x2 = sum x^2, count = N*H_l*W_l, summed over the ranks; single process:
    mean = x.mean, var = x.var(unbiased=False) over the concatenated BN inputs of all images."""
    root, (r0, r1) = two_rank_run
    assert r0["reduced"] == r1["reduced"]
    ds = load_synthetic(root / "dgh")
    inputs = _bn_inputs(_net().double(), _normalized(ds.images()))
    for layer, x in enumerate(inputs):
        s1, s2, n = (torch.tensor(r0["reduced"][3 * layer + k], dtype=torch.float64) for k in range(3))
        assert float(n) == x.shape[0] * x.shape[2] * x.shape[3]
        mean, var = s1 / n, s2 / n - (s1 / n) ** 2
        torch.testing.assert_close(mean, x.mean(dim=(0, 2, 3)), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(var, x.var(dim=(0, 2, 3), unbiased=False), rtol=1e-7, atol=1e-9)


def test_set_statistics_across_ranks_are_the_single_process_totals(two_rank_run):
    """SetStatistics(collective=True) over each rank's batches, after its all-reduce, holds the
    totals SetStatistics builds in one process from all five batches."""
    _, (r0, r1) = two_rank_run
    model = _net()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randn(3, *SHAPE, generator=g) for _ in range(5)]
    with B.BNCapture(model) as cap:
        moments = []
        for x in batches:
            with torch.no_grad():
                model(x)
            moments.append(cap.moments())
        single = B.SetStatistics(cap, moments).totals
    for totals in (r0["totals"], r1["totals"]):
        for (t1, t2, tn), (s1, s2, sn) in zip(totals, single):
            torch.testing.assert_close(torch.tensor(t1, dtype=torch.float64), s1, rtol=1e-12, atol=1e-9)
            torch.testing.assert_close(torch.tensor(t2, dtype=torch.float64), s2, rtol=1e-12, atol=1e-9)
            assert tn == sn == 5 * 3 * (8 * 8 if len(t1) == 4 else 4 * 4)


def test_resolve_device_maps_local_rank_to_its_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert DD.resolve_device("cuda") == torch.device("cuda", 1)
    assert DD.resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert DD.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DD.resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert DD.resolve_device("auto") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="local rank 2 has no GPU"):
        DD.resolve_device("cuda")
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an int"):
        DD.local_rank()


def test_split_evenly_covers_and_is_disjoint():
    for n in range(0, 9):
        for world in range(1, 5):
            parts = [list(DD.split_evenly(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
