"""Everything the report says about one packed checkpoint, as plain JSON-able values."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# what a quantize summary (``--json-out``) records that the report shows as recorded
RECORDED_KEYS = ("method", "calib_images", "calibration", "equalize", "bias_correction", "seconds_quantize")


def layer_rows(meta: dict, order: list[str], weight_db: dict | None, output_db: dict | None) -> list[dict]:
    """Bit policy per quantized layer, in ``order`` (the model's; config.json's keys are sorted), with its
    SQNR where measured."""
    rows = []
    for name in order:
        rec = meta["layers"][name]
        rows.append({"name": name, "kind": rec["kind"], "weight_bits": rec["weight_bits"], "act_bits": rec["act_bits"],
                     "weight_shape": rec["weight_shape"],
                     "weight_sqnr_db": None if weight_db is None else weight_db.get(name),
                     "output_sqnr_db": None if output_db is None else output_db.get(name)})
    return rows


def accuracy_row(record: dict | None, evaluated: dict | None) -> dict | None:
    """Top-1 as recorded by the run (its summary) and / or as measured now (``evaluated``)."""
    if evaluated:
        return {**evaluated, "source": "evaluated now"}
    if record and "quant_top1" in record:
        row = {k: record.get(k) for k in ("fp_top1", "quant_top1", "drop")}
        return {**row, "source": "recorded by the run"}
    return None


def checkpoint_facts(path: Path, *, reference: nn.Module | None, images: torch.Tensor | None,
                     record: dict | None = None, evaluate=None, trust_unverified: bool = False) -> dict:
    """Facts of the checkpoint at ``path``: metadata (arch, scheme, config, bit policy, folded BNs),
    sizes, per-layer weight and output SQNR against the folded float ``reference`` (None: not
    available), activation ranges with the ranges ``images`` reached, accuracy. ``evaluate(model)``
    returns ``{"quant_top1", ...}`` measured now, or None."""
    from ..config import QuantConfig
    from ..io import checkpoint_summary, load_quantized, read_metadata
    from ..quantize import quant_layers
    from .probe import probe
    from .ranges import activation_ranges
    from .sqnr import float_counterparts, weight_sqnr

    meta = read_metadata(path, trust_unverified)
    packed = load_quantized(path, trust_unverified=trust_unverified).cpu().eval()
    size = checkpoint_summary(path, trust_unverified=trust_unverified)
    notes = []
    weight_db, counterparts = None, None
    if reference is not None:
        counterparts = float_counterparts(reference, meta, str(path), "float_model (--model / --checkpoint)")
        weight_db = weight_sqnr(packed, counterparts)
        missing = [n for n in meta["layers"] if n not in counterparts]
        if missing:
            notes.append(f"{len(missing)} layer(s) inside swapped attention modules have no float counterpart of "
                         f"their own (e.g. {missing[0]}): no SQNR for them")
    result = probe(packed, images, reference, counterparts) if images is not None and len(images) else None
    ranges = activation_ranges(packed)
    for row in ranges:
        seen = result.input_range.get(row["layer"]) if result is not None and row["name"].endswith(".a_quant") else None
        row["seen_low"], row["seen_high"] = (None, None) if seen is None else seen
    if record and record.get("equalize"):
        notes.append("the run equalized the float model (cross-layer equalization) before quantizing: the SQNR here "
                     "is against the float model given, so rescaled channels count as error")
    facts = {
        "name": path.name, "path": str(path), "arch": meta.get("arch"), "package_version": meta.get("package_version"),
        "scheme": QuantConfig.from_dict(meta["quant_config"]).scheme_name, "config": meta["quant_config"],
        "folded_bn": meta.get("folded_bn", {}), "unhandled": meta.get("unhandled", {}),
        "attention": meta.get("attention", {}),
        "checkpoint_bytes": size["checkpoint_bytes"], "float_bytes": size["float_bytes"],
        "compression": size["compression"],
        "layers": layer_rows(meta, [n for n, _ in quant_layers(packed)], weight_db,
                             result.output_sqnr_db if result is not None and reference is not None else None),
        "activation_ranges": ranges,
        "probe": None if result is None else {"images": result.images, "logits_sqnr_db": result.logits_sqnr_db,
                                               "top1_agreement": result.top1_agreement},
        "accuracy": accuracy_row(record, evaluate(packed) if evaluate is not None else None),
        "recorded": {k: record[k] for k in RECORDED_KEYS if record and k in record},
        "notes": notes,
    }
    return facts
