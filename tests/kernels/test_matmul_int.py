"""matmul_int (attention's q.k^T and attn.v: activation x activation codes) on every backend row.

Exact int32 against the reference: attention shapes, 1-sized and odd dims, zero points per tensor /
head / row (column), non-contiguous operands (transposed, sliced, expanded), the extreme sums at the
largest exact K; then what is particular to each compiled backend (CPU, Triton, CUDA). The CPU rows run
each ISA level's micro-kernels (csrc/cpu/matmul.h); the layouts each level does not pick are covered by
csrc/tests/microkernels_check.cpp (tests/test_aarch64_kernels.py). The triton rows run in Triton's
interpreter on CPU tensors where there is no GPU; the CUDA tests skip without a GPU and a CUDA build.
"""
from __future__ import annotations

import pytest
import torch

from dfqkern.kernels import contract, dispatch, reference as R
from kernel_cases import ON_GPU, TB, TRITON_NEEDS_FRESH_PROCESS, assert_equal, cpu_backend, ctx

# (batch dims, M, K, N): the tiny ViT's two matmuls, then awkward ones
SHAPES = [((2, 3), 65, 32, 65), ((1, 2), 65, 65, 32), ((1, 1), 1, 1, 1), ((3,), 7, 1, 5), ((), 5, 129, 3),
          ((2, 1, 2), 17, 300, 20), ((1, 4), 2, 33, 17)]
ZP_KINDS = ["tensor", "scalar", "head", "row", "int64", "row_int64", "row_views", "row_batch_broadcast"]


def _codes(gen, *shape, high=256):
    return torch.randint(0, high, shape, generator=gen, dtype=torch.uint8)


def _zero_points(gen, kind, batch, m, n):
    """(a_zero_point, b_zero_point) of one kind, broadcastable to [*batch, M, 1] / [*batch, 1, N]."""
    nd = len(batch) + 2
    if kind in ("tensor", "int64"):
        dt = torch.int64 if kind == "int64" else torch.int32
        return _codes(gen, 1).to(dt), _codes(gen, 1).to(dt)
    if kind == "scalar":
        return _codes(gen, 1).reshape(()).int(), _codes(gen, 1).reshape(()).int()
    if kind == "head":  # one per head (the batch dim after the first), broadcast over batch and tokens
        h = batch[-1] if len(batch) >= 2 else 1
        shape = [1] * nd
        if len(batch) >= 2:
            shape[len(batch) - 1] = h
        return _codes(gen, *shape).int(), _codes(gen, *shape).int()
    if kind == "row_int64":  # converted, not read in place
        return _codes(gen, *batch, m, 1).long(), _codes(gen, *batch, 1, n).long()
    if kind == "row_views":  # non-contiguous: as attention's per-token v^T (a transposed [.., N, 1]) and a slice
        return (_codes(gen, *batch, m, 3).int()[..., 1:2], _codes(gen, *batch, n, 1).int().transpose(-2, -1))
    if kind == "row_batch_broadcast":  # per row, shared by every element of the leading batch dim
        lead = (1, *batch[1:]) if batch else ()
        return _codes(gen, *lead, m, 1).int(), _codes(gen, *lead, 1, n).int()
    return _codes(gen, *batch, m, 1).int(), _codes(gen, *batch, 1, n).int()  # per row / per column


@pytest.mark.parametrize("batch,m,k,n", SHAPES)
@pytest.mark.parametrize("zp", ZP_KINDS)
def test_matmul_int_random(row, gen, batch, m, k, n, zp):
    a, b = row.dev(_codes(gen, *batch, m, k)), row.dev(_codes(gen, *batch, k, n))
    za, zb = (row.dev(z) for z in _zero_points(gen, zp, batch, m, n))
    got = row.call("matmul_int", a, za, b, zb)
    assert got.shape == (*batch, m, n)
    assert_equal(got, R.matmul_int(a, za, b, zb), row=row.id, batch=batch, m=m, k=k, n=n, zp=zp)


@pytest.mark.parametrize("layout", ["b_transposed", "a_transposed", "sliced", "expanded_batch", "permuted_heads"])
def test_matmul_int_non_contiguous(row, gen, layout):
    """Views as attention passes them (k^T, v^T for per-token v) and others: strided reads, no copies needed."""
    if layout == "b_transposed":  # q . k^T: b is k [B, H, N, d] transposed
        a, b = _codes(gen, 2, 3, 65, 32), _codes(gen, 2, 3, 65, 32).transpose(-2, -1)
    elif layout == "a_transposed":
        a, b = _codes(gen, 2, 3, 32, 9).transpose(-2, -1), _codes(gen, 2, 3, 32, 11)
    elif layout == "sliced":  # every other row / column of larger tensors
        a, b = _codes(gen, 2, 14, 40)[:, ::2, 3:36], _codes(gen, 2, 33, 26)[:, :, ::2]
    elif layout == "expanded_batch":  # stride-0 batch dim
        a, b = _codes(gen, 1, 6, 10).expand(4, 6, 10), _codes(gen, 4, 10, 7)
    else:  # [B, N, H, d] codes viewed as [B, H, N, d]
        a, b = _codes(gen, 2, 65, 3, 32).permute(0, 2, 1, 3), _codes(gen, 2, 3, 32, 65)
    assert not (a.is_contiguous() and b.is_contiguous())
    n = b.shape[-1]
    za = _codes(gen, *a.shape[:-1], 1).int()
    zb = _codes(gen, *b.shape[:-2], 1, n).int()
    a, b, za, zb = row.dev(a), row.dev(b), row.dev(za), row.dev(zb)
    assert_equal(row.call("matmul_int", a, za, b, zb), R.matmul_int(a, za, b, zb), row=row.id, layout=layout)


@pytest.mark.parametrize("a_code,za,b_code,zb", [(255, 0, 255, 0), (0, 255, 0, 255), (255, 0, 0, 255), (0, 255, 255, 0)])
def test_matmul_int_extreme_sums_at_the_largest_exact_k(row, a_code, za, b_code, zb):
    k = contract.MATMUL_MAX_K  # |result| = K * 255**2, just below 2**31
    a = row.dev(torch.full((1, 2, k), a_code, dtype=torch.uint8))
    b = row.dev(torch.full((1, k, 3), b_code, dtype=torch.uint8))
    za_t, zb_t = row.dev(torch.tensor([za])), row.dev(torch.tensor([zb]))
    got = row.call("matmul_int", a, za_t, b, zb_t)
    want = k * (a_code - za) * (b_code - zb)
    assert abs(want) < 2 ** 31
    assert got.dtype == torch.int32 and bool((got.long() == want).all()), ctx(row=row.id, got=got.flatten()[:3].tolist(),
                                                                               want=want)


def test_matmul_int_empty_dims(row):
    for a_shape, b_shape in [((0, 4, 3), (0, 3, 5)), ((2, 0, 3), (2, 3, 5)), ((2, 4, 0), (2, 0, 5)),
                             ((2, 4, 3), (2, 3, 0))]:
        a, b = row.dev(torch.ones(a_shape, dtype=torch.uint8)), row.dev(torch.ones(b_shape, dtype=torch.uint8))
        z = row.dev(torch.zeros(1, dtype=torch.int32))
        got = row.call("matmul_int", a, z, b, z)
        assert_equal(got, R.matmul_int(a, z, b, z), row=row.id, a=a_shape, b=b_shape)


# ----------------------------------------------------------------------------- the CPU op itself

def test_cpu_runs_the_compiled_kernel_not_the_reference(gen, monkeypatch):
    cpu = cpu_backend()
    a, b = _codes(gen, 2, 3, 9, 8), _codes(gen, 2, 3, 8, 5)
    z = torch.tensor([7], dtype=torch.int32)
    want = R.matmul_int(a, z, b, z)

    def gone(*args, **kwargs):
        raise AssertionError("the CPU backend fell back to the reference")

    monkeypatch.setattr(R, "matmul_int", gone)
    assert_equal(dispatch.matmul_int(a, z, b, z, backend="cpu"), want)
    assert_equal(cpu.matmul_int(a, z, b, z), want)


@pytest.mark.parametrize("direct", [True, False], ids=["pybind", "dispatcher"])
def test_cpu_op_guards_its_arguments(gen, direct):
    """The C++ wrapper checks what it reads (called directly, without dispatch's contract)."""
    ops = cpu_backend()._load()
    op = __import__("dfqkern._C", fromlist=["cpu_matmul_int"]).cpu_matmul_int if direct else ops.cpu_matmul_int
    a, b, z = _codes(gen, 2, 5, 6), _codes(gen, 2, 6, 4), torch.zeros(1, dtype=torch.int32)
    big = contract.MATMUL_MAX_K + 1
    cases = [
        (TypeError, "a must be a uint8 tensor of codes", lambda: op(a.int(), z, b, z)),
        (TypeError, "b must be a uint8 tensor of codes", lambda: op(a, z, b.float(), z)),
        (ValueError, "a and b must be", lambda: op(a[0, 0], z, b, z)),
        (ValueError, "a and b must have one batch shape", lambda: op(a, z, b[:1], z)),
        (ValueError, "a has K=6 but b has K=5", lambda: op(a, z, b[:, :5], z)),
        (ValueError, f"K={big} exceeds {contract.MATMUL_MAX_K}",
         lambda: op(torch.zeros(1, big, dtype=torch.uint8), z, torch.zeros(big, 1, dtype=torch.uint8), z)),
        (TypeError, "a_zero_point must be an integer tensor", lambda: op(a, z.float(), b, z)),
        (TypeError, "b_zero_point must be an integer tensor", lambda: op(a, z, b, torch.zeros(1, dtype=torch.bool))),
        (ValueError, r"a_zero_point of shape \[2, 5, 2\] must have one element or broadcast to \[2, 5, 1\]",
         lambda: op(a, torch.zeros(2, 5, 2, dtype=torch.int32), b, z)),
        (ValueError, r"b_zero_point of shape \[2, 4\] must have one element", lambda: op(a, z, b, torch.zeros(2, 4).int())),
    ]
    if direct:  # the dispatcher would route a meta operand away from the CPU kernel before the wrapper runs
        cases.append((ValueError, "b must be a CPU tensor", lambda: op(a, z, b.to("meta"), z)))
    for exc, msg, fn in cases:
        with pytest.raises(exc, match=msg):
            fn()


# ----------------------------------------------------------------------------- the Triton kernel itself

@pytest.fixture
def triton_device(monkeypatch):
    """The device the Triton kernels take tensors on here (interpreted on CPU tensors without a GPU)."""
    if TB is None:
        pytest.skip("triton is an optional dependency (pip install dfqkern[triton])")
    if TRITON_NEEDS_FRESH_PROCESS:
        pytest.skip("triton was imported in compiled mode first: test_triton_backend.test_in_fresh_process runs these")
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton reads it during interpretation too
    return "cuda" if ON_GPU else "cpu"


def _interpreter_tile():
    from dfqkern.kernels.triton.gemm import INTERPRETER_CONFIGS

    kw = INTERPRETER_CONFIGS[0].kwargs
    return kw["BM"], kw["BK"], kw["BN"]


@pytest.mark.parametrize("dm,dk,dn", [(0, 0, 0), (1, 1, 1), (-1, -1, -1), (1, 31, -1)])
def test_triton_matmul_int_tile_edges(triton_device, gen, dm, dk, dn):
    """M, K, N at the interpreter's tile sizes and one off (partial tiles, a second K step)."""
    bm, bk, bn = _interpreter_tile()
    m, k, n = bm + dm, bk + dk, bn + dn
    a, b = _codes(gen, 2, m, k).to(triton_device), _codes(gen, 2, k, n).to(triton_device)
    za, zb = _codes(gen, 2, m, 1).int().to(triton_device), _codes(gen, 1, 1, n).int().to(triton_device)
    assert_equal(TB.matmul_int(a, za, b, zb), R.matmul_int(a, za, b, zb), m=m, k=k, n=n)


def test_triton_matmul_int_is_one_launch_of_the_kernel(triton_device, gen, monkeypatch):
    from dfqkern.kernels.triton import matmul as TM

    a, b = _codes(gen, 3, 2, 9, 8).to(triton_device), _codes(gen, 3, 2, 8, 5).to(triton_device)
    za, zb = _codes(gen, 1, 2, 1, 1).int().to(triton_device), torch.tensor([7], device=triton_device)
    want = R.matmul_int(a, za, b, zb)
    TM.matmul_int(a, za, b, zb)  # warm-up: autotuning on a GPU launches every config
    launches = []
    run = TM._matmul_int_kernel.run
    monkeypatch.setattr(TM._matmul_int_kernel, "run", lambda *x, **kw: launches.append(1) or run(*x, **kw))

    def gone(*args, **kwargs):
        raise AssertionError("the Triton backend fell back to the reference")

    monkeypatch.setattr(R, "matmul_int", gone)
    assert_equal(dispatch.matmul_int(a, za, b, zb, backend="triton"), want)
    assert launches == [1]  # all six batch elements in one launch


def test_triton_matmul_int_zero_points_outside_the_code_range(triton_device, gen):
    """int32 arithmetic modulo 2**32 is exact whenever the result fits, whatever the zero points."""
    a, b = _codes(gen, 2, 5, 70).to(triton_device), _codes(gen, 2, 70, 3).to(triton_device)
    za = torch.randint(-1000, 1000, (2, 5, 1), generator=gen).to(triton_device)
    zb = torch.randint(-1000, 1000, (1, 1, 3), generator=gen, dtype=torch.int32).to(triton_device)
    assert_equal(TB.matmul_int(a, za, b, zb), R.matmul_int(a, za, b, zb))


def test_triton_matmul_int_declines_cpu_tensors_when_compiled(triton_device, gen, monkeypatch):
    from dfqkern.kernels.triton import common

    monkeypatch.setattr(common, "INTERPRET", False)
    a, b, z = _codes(gen, 2, 3, 4), _codes(gen, 2, 4, 5), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(contract.Unsupported, match="a is on cpu"):
        TB.matmul_int(a, z, b, z)


@pytest.mark.parametrize("bad,exc,msg", [
    ("int_codes", TypeError, "a must be a uint8 tensor of codes"),
    ("k_mismatch", ValueError, "a has K=4 but b has K=3"),
    ("zp_shape", ValueError, "a_zero_point of shape"),
    ("float_zp", TypeError, "b_zero_point must be an integer tensor"),
])
def test_triton_matmul_int_argument_errors_name_the_argument(triton_device, gen, bad, exc, msg):
    a, b = _codes(gen, 2, 3, 4).to(triton_device), _codes(gen, 2, 4, 5).to(triton_device)
    za = zb = torch.zeros(1, dtype=torch.int32, device=triton_device)
    if bad == "int_codes":
        a = a.int()
    elif bad == "k_mismatch":
        b = b[:, :3]
    elif bad == "zp_shape":
        za = torch.zeros(2, 3, 2, dtype=torch.int32, device=triton_device)
    else:
        zb = zb.float()
    with pytest.raises(exc, match=msg):
        dispatch.matmul_int(a, za, b, zb, backend="triton")


# ----------------------------------------------------------------------------- the CUDA op itself

def test_batched_operands_flatten_the_batch_and_broadcast_zero_points(gen):
    """What the CUDA (and Triton) kernels read: [B, M, K] / [B, K, N] codes, int32 [B, M] / [B, N] zero points."""
    from dfqkern.kernels import cuda as C

    a = _codes(gen, 2, 3, 5, 4)
    b = _codes(gen, 2, 3, 6, 4).transpose(-2, -1)  # k^T: a view, flattened without a copy
    cases = [(_codes(gen, 1).long(), _codes(gen, 1).reshape(())),
             (_codes(gen, 1, 3, 1, 1).int(), _codes(gen, 1, 3, 1, 1).int()),
             (_codes(gen, 2, 3, 5, 1).int(), _codes(gen, 2, 1, 1, 6).long()),
             (_codes(gen, 2, 3, 5, 3).int()[..., 1:2], _codes(gen, 2, 3, 6, 1).int().transpose(-2, -1))]
    for za, zb in cases:
        a3, za2, b3, zb2 = C.batched_operands(a, za, b, zb)
        assert a3.data_ptr() == a.data_ptr() and b3.data_ptr() == b.data_ptr()
        assert torch.equal(a3, a.reshape(6, 5, 4)) and torch.equal(b3, b.reshape(6, 4, 6))
        assert za2.dtype == zb2.dtype == torch.int32
        assert torch.equal(za2, za.int().expand(2, 3, 5, 1).reshape(6, 5)), ctx(za=tuple(za.shape))
        assert torch.equal(zb2, zb.int().expand(2, 3, 1, 6).reshape(6, 6)), ctx(zb=tuple(zb.shape))
        if za.numel() == 1:
            assert za2.stride() == (0, 0) and zb2.stride() == (0, 0)  # broadcast, not copied


def test_cuda_declines_what_it_cannot_run(gen, monkeypatch):
    from dfqkern.kernels import cuda as C

    a, b, z = _codes(gen, 2, 3, 4), _codes(gen, 2, 4, 5), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(contract.Unsupported, match="CUDA tensors"):
        C.matmul_int(a, z, b, z)
    monkeypatch.setattr(C, "_require_cuda", lambda t: t.device)
    monkeypatch.setattr(C, "extension_has_matmul", lambda: False)
    with pytest.raises(contract.Unsupported, match="no cuda_matmul_int"):
        C.matmul_int(a, z, b, z)


def _cuda_backend():
    from dfqkern.kernels import cuda as C

    if not (C.is_available() and C.extension_has_matmul()):
        pytest.skip(f"needs a CUDA device and dfqkern._C built with {C.MATMUL_OP} (cuda available: "
                    f"{torch.cuda.is_available()}, extension op: {C.extension_has_matmul()})")
    return C


def test_cuda_matmul_int_runs_the_kernel_not_the_reference(gen, monkeypatch):
    C = _cuda_backend()
    # ViT-B/16 q.k^T at batch 2 (k^T a transposed view, per-token zero points) and attn.v; several 64 x 64 tiles
    q, k = _codes(gen, 2, 12, 197, 64).cuda(), _codes(gen, 2, 12, 197, 64).cuda()
    p, v = _codes(gen, 2, 12, 197, 197).cuda(), _codes(gen, 2, 12, 197, 64).cuda()
    zq, zk = _codes(gen, 2, 12, 197, 1).int().cuda(), _codes(gen, 2, 12, 197, 1).int().cuda().transpose(-2, -1)
    zp, zv = torch.tensor([0], device="cuda"), _codes(gen, 1, 12, 1, 1).int().cuda()
    want = [R.matmul_int(q, zq, k.transpose(-2, -1), zk), R.matmul_int(p, zp, v, zv)]

    def gone(*args, **kwargs):
        raise AssertionError("the CUDA backend fell back to the reference")

    monkeypatch.setattr(R, "matmul_int", gone)
    assert_equal(dispatch.matmul_int(q, zq, k.transpose(-2, -1), zk, backend="cuda"), want[0])
    assert_equal(C.matmul_int(p, zp, v, zv), want[1])


def test_cuda_matmul_int_zero_points_outside_the_code_range(gen):
    C = _cuda_backend()
    a, b = _codes(gen, 2, 5, 70).cuda(), _codes(gen, 2, 70, 3).cuda()
    za = torch.randint(-1000, 1000, (2, 5, 1), generator=gen).cuda()
    zb = torch.randint(-1000, 1000, (1, 1, 3), generator=gen, dtype=torch.int32).cuda()
    assert_equal(C.matmul_int(a, za, b, zb), R.matmul_int(a, za, b, zb))


def test_cuda_op_guards_its_arguments(gen):
    """The C++ op checks what it reads (called directly, without the contract or batched_operands)."""
    op = _cuda_backend()._ops().cuda_matmul_int
    a, b = _codes(gen, 2, 5, 6).cuda(), _codes(gen, 2, 6, 4).cuda()
    za, zb = torch.zeros(2, 5, dtype=torch.int32, device="cuda"), torch.zeros(2, 4, dtype=torch.int32, device="cuda")
    big = contract.MATMUL_MAX_K + 1
    cases = [
        ("a and b must be uint8 codes", lambda: op(a.int(), za, b, zb)),
        ("a_zp and b_zp must be int32", lambda: op(a, za.long(), b, zb)),
        ("a and b must be \\[batch, M, K\\]", lambda: op(a[0], za, b, zb)),
        ("b must be \\[2, 6, N\\]", lambda: op(a, za, b[:, :5], zb)),
        ("a_zp must be \\[2, 5\\]", lambda: op(a, za[:, :1], b, zb)),
        ("b_zp must be \\[2, 4\\]", lambda: op(a, za, b, zb[:1])),
        ("b must be a CUDA tensor", lambda: op(a, za, b.cpu(), zb)),
        (f"K={big} exceeds {contract.MATMUL_MAX_K}",
         lambda: op(torch.zeros(1, 1, big, dtype=torch.uint8, device="cuda"), za[:1, :1],
                    torch.zeros(1, big, 1, dtype=torch.uint8, device="cuda"), zb[:1, :1])),
    ]
    for msg, fn in cases:
        with pytest.raises(RuntimeError, match=msg):
            fn()
