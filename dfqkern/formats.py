"""Integer grids, quantization schemes and the packed storage layout.

One convention everywhere in dfqkern (reference ops, kernels, checkpoints):

* A ``b``-bit quantized value is stored as an **unsigned code** ``c`` in ``[0, 2**b - 1]``.
* Its real value is ``scale * (c - zero_point)``, with ``zero_point`` an integer code in the
  same range. Symmetric quantization is the special case ``zero_point = 2**(b-1)`` (so the
  signed integer ``c - 2**(b-1)`` lies in ``[-2**(b-1), 2**(b-1) - 1]``); asymmetric
  quantization picks any ``zero_point``. Kernels therefore only ever see unsigned codes and
  per-row (weights) or per-tensor / per-token (activations) zero points.

Packed layout ``"kpack-lsb-v1"`` (weights ``[N, K]`` and activations ``[M, K]`` alike):

* Packing runs along the reduction dimension ``K`` (the last one). Codes are stored in slots of
  ``storage_bits(bits)`` bits: 2-bit codes in 2-bit slots (4 per byte), 3- and 4-bit codes in
  4-bit slots (2 per byte), 8-bit codes in whole bytes.
* Element ``k`` of a row lives in byte ``k // per_byte`` at bit offset ``(k % per_byte) * slot``
  (least significant slot first).
* ``K`` is padded up to a multiple of ``per_byte``; padded slots hold the row's zero point, so
  they contribute exactly zero to any integer dot product.
* Conv2d weights ``[O, C/groups, kh, kw]`` are flattened to ``[O, kh * kw * C/groups]`` in
  ``(kh, kw, c)`` order (the order an NHWC implicit GEMM walks), see :func:`conv_weight_to_matrix`.

Backends may derive their own layouts from this one at load time; this one is what
checkpoints store.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

PACK_LAYOUT = "kpack-lsb-v1"
WEIGHT_BITS = (2, 3, 4, 8)  # packed weight widths (and the grids the elementwise kernels compute)
ACT_BITS = (4, 8)  # activation widths the packed kernels run natively
FAKE_QUANT_ACT_BITS = (2, 3, 4, 8)  # activation widths fake-quant calibrates (research tables: A3, A2)


def check_bits(bits: int, allowed: tuple[int, ...], name: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {bits!r}")
    return bits


def code_max(bits: int) -> int:
    """Largest unsigned code of a ``bits``-bit grid."""
    return (1 << bits) - 1


def symmetric_zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def storage_bits(bits: int) -> int:
    """Width of the slot a ``bits``-bit code is stored in (3-bit codes use 4-bit slots)."""
    check_bits(bits, (2, 3, 4, 8), "bits")
    return {2: 2, 3: 4, 4: 4, 8: 8}[bits]


def per_byte(bits: int) -> int:
    return 8 // storage_bits(bits)


def packed_width(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` codes."""
    return -(-k // per_byte(bits))


@dataclass(frozen=True)
class QuantScheme:
    """Weight and activation bit widths, e.g. ``w4a8`` or ``w2a4``; ``abits=None`` is weight-only."""

    wbits: int
    abits: int | None

    def __post_init__(self):
        check_bits(self.wbits, WEIGHT_BITS, "wbits")
        if self.abits is not None:
            check_bits(self.abits, ACT_BITS, "abits")

    @property
    def name(self) -> str:
        return f"w{self.wbits}" + (f"a{self.abits}" if self.abits is not None else "")

    @classmethod
    def parse(cls, text: str) -> "QuantScheme":
        m = re.fullmatch(r"w(\d+)(?:a(\d+))?", text.strip().lower())
        if not m:
            raise ValueError(f"scheme must look like 'w4a8', 'w2a4' or 'w4' (weight-only), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)) if m.group(2) else None)

    def __str__(self) -> str:
        return self.name


def pack_codes(codes: torch.Tensor, bits: int, pad_code: torch.Tensor | int = 0) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes ``[..., K]`` along the last dim into uint8 ``[..., ceil(K/per_byte)]``.

    ``pad_code`` fills the padded tail: an int, or a tensor broadcastable to ``codes.shape[:-1]``
    (the per-row zero point).
    """
    if codes.dim() < 1:
        raise ValueError("codes must have at least one dimension (the K dimension to pack)")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    slot, n = storage_bits(bits), per_byte(bits)
    c = codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > code_max(bits)):
        raise ValueError(f"codes must lie in [0, {code_max(bits)}] for {bits}-bit packing")
    k = c.shape[-1]
    pad = packed_width(k, bits) * n - k
    if pad:
        fill = torch.as_tensor(pad_code, dtype=torch.int32, device=c.device)
        fill = fill.expand(c.shape[:-1]).unsqueeze(-1).expand(*c.shape[:-1], pad)
        c = torch.cat([c, fill], dim=-1)
    c = c.reshape(*c.shape[:-1], -1, n)
    shifts = torch.arange(n, dtype=torch.int32, device=c.device) * slot
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., B]`` -> uint8 codes ``[..., k]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    slot, n = storage_bits(bits), per_byte(bits)
    if packed.shape[-1] * n < k or packed.shape[-1] != packed_width(k, bits):
        raise ValueError(
            f"packed has {packed.shape[-1]} bytes per row; {k} {bits}-bit codes need {packed_width(k, bits)}")
    p = packed.to(torch.int32).unsqueeze(-1)
    shifts = torch.arange(n, dtype=torch.int32, device=packed.device) * slot
    c = (p >> shifts) & ((1 << slot) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)


def conv_weight_to_matrix(w: torch.Tensor) -> torch.Tensor:
    """``[O, C/g, kh, kw]`` -> ``[O, kh*kw*C/g]`` in ``(kh, kw, c)`` order."""
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)


def matrix_to_conv_weight(m: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_matrix` for a weight of ``shape`` ``[O, C/g, kh, kw]``."""
    o, c, kh, kw = shape
    return m.reshape(o, kh, kw, c).permute(0, 3, 1, 2).contiguous()


@dataclass
class PackedWeight:
    """A weight in the packed layout: codes ``[N, packed_width(K)]`` plus per-row scale / zero point."""

    data: torch.Tensor  # uint8 [N, packed_width(k, bits)]
    scale: torch.Tensor  # float32 [N]
    zero_point: torch.Tensor  # int32 [N], codes
    bits: int
    k: int
    shape: tuple[int, ...]  # the float weight's shape (Linear [N, K] or Conv2d [O, C/g, kh, kw])
    # Backend-derived layouts (e.g. a CPU kernel's tile order), keyed by backend name; never saved.
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                   shape: tuple[int, ...] | None = None) -> "PackedWeight":
        if codes.dim() != 2:
            raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
        zp = zero_point.reshape(-1).to(torch.int32)
        return cls(pack_codes(codes, bits, zp), scale.reshape(-1).float(), zp, bits, codes.shape[1],
                   tuple(shape) if shape is not None else tuple(codes.shape))

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def n(self) -> int:
        return self.data.shape[0]

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.data, self.bits, self.k)

    def int_matrix(self) -> torch.Tensor:
        """``codes - zero_point`` as int32 ``[N, K]``: the signed integers the GEMM multiplies."""
        return self.codes().to(torch.int32) - self.zero_point[:, None]

    def dequantize(self) -> torch.Tensor:
        """Float weight in its original shape."""
        m = self.int_matrix().float() * self.scale[:, None]
        return matrix_to_conv_weight(m, self.shape) if len(self.shape) == 4 else m.reshape(self.shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero_point))


@dataclass
class PackedActivation:
    """Quantized activations ``[M, K]`` in the packed layout with per-tensor or per-token parameters."""

    data: torch.Tensor  # uint8 [M, packed_width(k, bits)]
    scale: torch.Tensor  # float32 [1] (per-tensor) or [M] (per-token)
    zero_point: torch.Tensor  # int32, same shape as scale
    bits: int
    k: int

    @property
    def device(self) -> torch.device:
        return self.data.device

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.data, self.bits, self.k)

    def int_matrix(self) -> torch.Tensor:
        return self.codes().to(torch.int32) - self.zero_point.reshape(-1, 1)
