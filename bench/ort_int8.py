"""onnxruntime's own static int8 model of a float torch model: the peer a deployer would pick instead of dfqkern.

Its documented flow on the float ONNX export: ``quant_pre_process`` (shape inference, graph optimization),
then ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations, MinMax calibration). Both choices
decide whether onnxruntime runs int8 at all (CIFAR ResNet-20 b1, 1 thread, Xeon VNNI): without the
pre-processing a random-init export shares its identical zero conv biases through Identity nodes, which
quantize_static leaves unquantized, and onnxruntime fuses no Conv (fp32 convs between Q/DQ, slower than
onnxruntime fp32); with int8 activations its x86 fusions take 9 of 19 Convs and no Add (~870 us); uint8
activations (the U8S8 kernels MLAS has on x86; dfqkern's activations are uint8 codes too) make every Conv a
QLinearConv and every Add a QLinearAdd (~290 us). :func:`quantize_int8` reports how many Convs run int8, read
from the graph onnxruntime optimizes, so a caller can refuse a peer that silently runs float.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch


def float_onnx(model: torch.nn.Module, example: torch.Tensor, dynamic_batch: bool = False) -> bytes:
    """``model`` exported to ONNX (opset 17, input ``x``, output ``y``; ``dynamic_batch``: any batch size)."""
    buf = io.BytesIO()
    axes = {"x": {0: "batch"}, "y": {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False, dynamic_axes=axes)
    return buf.getvalue()


def session(model: "bytes | Path", threads: int, optimized_path: "Path | None" = None):
    """A CPU session with ``threads`` intra-op threads; ``optimized_path``: where onnxruntime writes the graph it
    runs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def quantize_int8(float_model: bytes, images: torch.Tensor, work: Path, threads: int):
    """onnxruntime's static int8 model of ``float_model`` calibrated on ``images`` (one per calibration batch),
    built under ``work``: ``(session, int8 convs, all convs)``, counted in the graph onnxruntime runs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": im[None].numpy()} for im in images])

        def get_next(self):
            return next(self.batches, None)

    work.mkdir(parents=True, exist_ok=True)
    src, pre, dst, opt = (work / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx", "int8.opt.onnx"))
    src.write_bytes(float_model)
    quant_pre_process(str(src), str(pre))
    quantize_static(str(pre), str(dst), Images(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    sess = session(dst.read_bytes(), threads, optimized_path=opt)
    ops = [n.op_type for n in onnx.load(str(opt)).graph.node]
    int8 = ops.count("QLinearConv")
    return sess, int8, int8 + ops.count("Conv") + ops.count("FusedConv") + ops.count("NhwcFusedConv")
