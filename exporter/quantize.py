"""Quantized variants of the fp32 graph, made with onnxruntime's own tools (torch-free)."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ExporterError, UnsupportedError
from .export import OnnxArtifact

QUANTIZE_MODES = ("int8", "fp16", "int4")
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx", "int4": "model.int4.onnx"}
DEFAULT_INT4_BLOCK = 32


def quantize(fp32: OnnxArtifact, mode: str, out_dir: Path, *, block_size: int = DEFAULT_INT4_BLOCK,
             int4_embedding: bool = False) -> OnnxArtifact:
    if mode not in QUANTIZE_MODES:
        raise UnsupportedError(f"quantize mode {mode!r} is not supported; use one of: {', '.join(QUANTIZE_MODES)}, none")
    path = out_dir / VARIANT_FILES[mode]
    external = bool(fp32.data_files)
    try:
        if mode == "int8":
            _int8(fp32.path, path, external)
        elif mode == "int4":
            _int4(fp32.path, path, external, block_size, int4_embedding)
        else:
            _fp16(fp32.path, path, external)
    except (ExporterError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's tools raise plain Exceptions
        raise ExporterError(f"{mode} quantization failed: {type(e).__name__}: {str(e)[:200]}") from e
    data = path.with_name(path.name + ".data")
    return OnnxArtifact(mode, path, (data,) if data.exists() else (), fp32.opset, fp32.input_names, fp32.output_names)


def _int8(src: Path, dst: Path, external: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Dynamic per-channel int8: measured accurate and 2-4x faster than torch eager on CPUs; full static
    # QDQ gave wrong labels. The "run pre-processing" hint onnxruntime logs on the root logger does not
    # apply to dynamic mode, so it is filtered out for the duration of the call.
    root = logging.getLogger()
    hint = _DropMessage("pre-processing before quantization")
    root.addFilter(hint)
    try:
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=external
        )
    finally:
        root.removeFilter(hint)


class _DropMessage(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


def _int4(src: Path, dst: Path, external: bool, block_size: int, embedding: bool) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # Weight-only 4-bit (MatMulNBits, contrib op of onnxruntime): activations stay float, so accuracy holds
    # while weights shrink ~7x. Gather (the embedding) only on request: it is read once per token.
    ops = ("MatMul", "Gather") if embedding else ("MatMul",)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block_size, is_symmetric=True,
                             op_types_to_quantize=ops)
    q.process()
    matmuls = [n for n in q.model.model.graph.node if n.op_type == "MatMulNBits"]
    if not matmuls:
        raise ExporterError(f"int4: no MatMul weight could be quantized in {src.name} (block size {block_size})")
    q.model.save_model_to_file(str(dst), external)


def _fp16(src: Path, dst: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnxruntime's converter (keep_io_types) works where onnxconverter-common's produced broken graphs.
    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True)
    if external:
        onnx.save(model16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    else:
        onnx.save(model16, str(dst))
