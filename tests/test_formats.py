"""Codes, schemes and the packed layout kpack-lsb-v1: exact round trips and the documented bit layout."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dfqkern.formats import (PACK_LAYOUT, PackedActivation, PackedWeight, QuantScheme, check_bits, code_max,
                             conv_weight_to_matrix, matrix_to_conv_weight, pack_codes, packed_width, per_byte,
                             storage_bits, symmetric_zero_point, unpack_codes)

BITS = st.sampled_from([2, 3, 4, 8])
SETTINGS = settings(max_examples=30, deadline=None)


def _slot_layout_pack(codes: list[int], bits: int, pad: int) -> list[int]:
    """Independent pure-python packing of one row, written from the layout's docstring."""
    slot = {2: 2, 3: 4, 4: 4, 8: 8}[bits]
    n = 8 // slot
    out = []
    for b in range(-(-len(codes) // n)):
        byte = 0
        for j in range(n):
            k = b * n + j
            byte |= (codes[k] if k < len(codes) else pad) << (j * slot)
        out.append(byte)
    return out


@st.composite
def codes_and_zp(draw, max_lead_dims=2):
    bits = draw(BITS)
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=max_lead_dims))
    k = draw(st.integers(1, 19))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, code_max(bits) + 1, (*lead, k), generator=g, dtype=torch.int64)
    zp = torch.randint(0, code_max(bits) + 1, tuple(lead), generator=g, dtype=torch.int32)
    return bits, codes, zp


@SETTINGS
@given(data=codes_and_zp(), dtype=st.sampled_from([torch.uint8, torch.int32, torch.int64]))
def test_pack_unpack_round_trip_and_padding(data, dtype):
    bits, codes, zp = data
    k = codes.shape[-1]
    packed = pack_codes(codes.to(dtype), bits, zp if codes.dim() > 1 else int(zp))
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], packed_width(k, bits))
    assert packed_width(k, bits) * per_byte(bits) >= k > (packed_width(k, bits) - 1) * per_byte(bits)
    out = unpack_codes(packed, bits, k)
    assert out.dtype == torch.uint8 and out.shape == codes.shape
    assert torch.equal(out.long(), codes)
    # Padded slots hold the row's zero point, so they add nothing to an integer dot product.
    full = unpack_codes(packed, bits, packed.shape[-1] * per_byte(bits))
    tail = full[..., k:].long()
    assert torch.equal(tail, zp.long().unsqueeze(-1).expand_as(tail))


@SETTINGS
@given(bits=BITS, k=st.integers(1, 13), pad=st.integers(0, 255), seed=st.integers(0, 1000))
def test_byte_layout_matches_documented_order(bits, k, pad, seed):
    pad = pad % (code_max(bits) + 1)
    g = torch.Generator().manual_seed(seed)
    row = torch.randint(0, code_max(bits) + 1, (k,), generator=g)
    packed = pack_codes(row, bits, pad)
    assert packed.tolist() == _slot_layout_pack(row.tolist(), bits, pad)


def test_layout_constants():
    assert PACK_LAYOUT == "kpack-lsb-v1"
    assert [storage_bits(b) for b in (2, 3, 4, 8)] == [2, 4, 4, 8]
    assert [per_byte(b) for b in (2, 3, 4, 8)] == [4, 2, 2, 1]
    assert [code_max(b) for b in (2, 3, 4, 8)] == [3, 7, 15, 255]
    assert [symmetric_zero_point(b) for b in (2, 3, 4, 8)] == [2, 4, 8, 128]
    assert packed_width(7, 2) == 2 and packed_width(8, 2) == 2 and packed_width(9, 2) == 3
    assert packed_width(5, 3) == 3 and packed_width(5, 8) == 5
    # 2-bit: codes 1,2,3,0 -> 0b00_11_10_01
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_codes(torch.tensor([0xA, 0x5, 0x7]), 4, 0x3).tolist() == [0x5A, 0x37]


def test_pack_errors():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match=r"\[0, 7\]"):
        pack_codes(torch.tensor([-1, 2]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([0.0, 1.0]), 4)
    with pytest.raises(TypeError, match="integer"):
        pack_codes(torch.tensor([True, False]), 4)
    with pytest.raises(ValueError, match="at least one dimension"):
        pack_codes(torch.tensor(1), 4)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        pack_codes(torch.tensor([1]), 5)
    with pytest.raises(TypeError, match="uint8"):
        unpack_codes(torch.tensor([1], dtype=torch.int32), 4, 2)
    with pytest.raises(ValueError, match="need 3"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 5)
    with pytest.raises(ValueError, match="need 1"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 4, 2)


def test_check_bits():
    assert check_bits(4, (2, 4), "wbits") == 4
    for bad in (True, 4.0, "4", 5, None):
        with pytest.raises(ValueError, match=r"wbits must be one of \(2, 4\)"):
            check_bits(bad, (2, 4), "wbits")


def test_quant_scheme():
    assert QuantScheme.parse("W4A8") == QuantScheme(4, 8)
    assert QuantScheme.parse(" w2a4 ").name == "w2a4"
    assert QuantScheme.parse("w3") == QuantScheme(3, None) and str(QuantScheme(3, None)) == "w3"
    with pytest.raises(ValueError, match="wbits must be one of"):
        QuantScheme.parse("w5a8")
    with pytest.raises(ValueError, match="abits must be one of"):
        QuantScheme.parse("w4a2")
    with pytest.raises(ValueError, match="scheme must look like"):
        QuantScheme.parse("int4")


@SETTINGS
@given(o=st.integers(1, 5), c=st.integers(1, 5), kh=st.integers(1, 4), kw=st.integers(1, 4), seed=st.integers(0, 99))
def test_conv_weight_matrix_inverse_and_order(o, c, kh, kw, seed):
    w = torch.randn(o, c, kh, kw, generator=torch.Generator().manual_seed(seed))
    m = conv_weight_to_matrix(w)
    assert m.shape == (o, kh * kw * c)
    assert torch.equal(matrix_to_conv_weight(m, tuple(w.shape)), w)
    # (kh, kw, c) order: column (i*kw + j)*c + ch holds w[:, ch, i, j]
    i, j, ch = kh - 1, kw - 1, c - 1
    assert torch.equal(m[:, (i * kw + j) * c + ch], w[:, ch, i, j])
    assert torch.equal(m[:, 1 % (kh * kw * c)], w.permute(0, 2, 3, 1).reshape(o, -1)[:, 1 % (kh * kw * c)])
    # the inverse of the inverse, for a matrix
    assert torch.equal(conv_weight_to_matrix(matrix_to_conv_weight(m, tuple(w.shape))), m)


@SETTINGS
@given(bits=BITS, n=st.integers(1, 6), k=st.integers(1, 17), conv=st.booleans(), seed=st.integers(0, 999))
def test_packed_weight_from_codes(bits, n, k, conv, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, code_max(bits) + 1, (n, k), generator=g).to(torch.uint8)
    zp = torch.randint(0, code_max(bits) + 1, (n,), generator=g)
    scale = torch.rand(n, generator=g) + 0.01
    shape = (n, k, 1, 1) if conv else None
    pw = PackedWeight.from_codes(codes, scale, zp, bits, shape)
    assert pw.n == n and pw.k == k and pw.bits == bits and pw.device.type == "cpu"
    assert pw.data.shape == (n, packed_width(k, bits)) and pw.zero_point.dtype == torch.int32
    assert pw.shape == ((n, k, 1, 1) if conv else (n, k))
    assert torch.equal(pw.codes(), codes)
    ints = pw.int_matrix()
    assert ints.dtype == torch.int32
    assert torch.equal(ints, codes.to(torch.int32) - zp.to(torch.int32)[:, None])
    deq = pw.dequantize()
    expect = (codes.double() - zp.double()[:, None]) * scale.double()[:, None]
    assert deq.shape == pw.shape
    torch.testing.assert_close(deq.reshape(n, k).double(), expect, rtol=1e-6, atol=1e-7)
    assert pw.nbytes() == n * packed_width(k, bits) + 4 * n + 4 * n


def test_packed_weight_conv_dequantize_uses_layout_order():
    w_codes = torch.randint(0, 16, (3, 2, 2, 3), generator=torch.Generator().manual_seed(0))
    pw = PackedWeight.from_codes(conv_weight_to_matrix(w_codes), torch.full((3,), 0.5), torch.full((3,), 8), 4,
                                 tuple(w_codes.shape))
    assert torch.equal(pw.dequantize(), (w_codes.float() - 8) * 0.5)


def test_packed_weight_errors():
    with pytest.raises(ValueError, match=r"codes must be \[N, K\]"):
        PackedWeight.from_codes(torch.zeros(2, 3, 4, dtype=torch.uint8), torch.ones(2), torch.zeros(2), 4)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        PackedWeight.from_codes(torch.full((2, 3), 4, dtype=torch.uint8), torch.ones(2), torch.zeros(2), 2)


def test_packed_activation_int_matrix():
    codes = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.uint8)
    zp = torch.tensor([1, 4], dtype=torch.int32)
    pa = PackedActivation(pack_codes(codes, 4, zp), torch.ones(2), zp, 4, 3)
    assert torch.equal(pa.codes(), codes)
    assert pa.int_matrix().tolist() == [[0, 1, 2], [0, 1, 2]]
    pa1 = PackedActivation(pack_codes(codes, 8), torch.ones(1), torch.tensor([2], dtype=torch.int32), 8, 3)
    assert pa1.int_matrix().tolist() == [[-1, 0, 1], [2, 3, 4]]
