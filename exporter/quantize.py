"""Quantized variants of the fp32 graph, made with onnxruntime's own tools (torch-free)."""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ExporterError, UnsupportedError
from .formats import VARIANT_FILES
from .onnx_export import OnnxArtifact
from .stages import Stages

QUANTIZE_MODES = ("int8", "fp16", "int4")
DEFAULT_INT4_BLOCK = 32


def variant_dtype(mode: str, *, decoder: bool, block_size: int = DEFAULT_INT4_BLOCK,
                  int4_embedding: bool = False) -> str:
    """What a variant holds, as recorded in the manifest (``variants.NAME.dtype``)."""
    from .weightonly import INT8_BLOCK

    if mode == "int8":
        return f"int8-weight-only-block{INT8_BLOCK}" if decoder else "int8-dynamic-per-channel-s7"
    if mode == "int4":
        return f"int4-weight-only-block{block_size}-min-offset" + ("-int4-embedding" if int4_embedding else "")
    return {"fp32": "float32", "fp16": "float16"}[mode]


def quantize(fp32: OnnxArtifact, mode: str, out_dir: Path, *, decoder: bool, block_size: int = DEFAULT_INT4_BLOCK,
             int4_embedding: bool = False, adapter_modules: tuple[str, ...] = ()) -> OnnxArtifact:
    """One quantized variant of the fp32 graph. Decoders get weight-only int8/int4, encoders dynamic int8.

    ``adapter_modules``: names of the modules a merged adapter changed (q_proj, ...); int4 keeps them at 8 bits.
    """
    if mode not in QUANTIZE_MODES:
        raise UnsupportedError(f"quantize mode {mode!r} is not supported; use one of: {', '.join(QUANTIZE_MODES)}, none")
    path = out_dir / VARIANT_FILES[mode]
    external = bool(fp32.data_files)
    try:
        if mode == "int8" and not decoder:
            _int8(fp32.path, path, external)
        elif mode in ("int8", "int4"):
            from .weightonly import INT8_BLOCK, WeightOnlySpec, quantize_weights

            spec = (WeightOnlySpec(8, INT8_BLOCK) if mode == "int8"
                    else WeightOnlySpec(4, block_size, 4 if int4_embedding else 8, adapter_modules))
            quantize_weights(fp32.path, path, spec, external)
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

    # Dynamic per-channel int8 for encoders: full static QDQ gave wrong labels. The weights are signed and 7-bit
    # (reduce_range: codes within +-64). onnxruntime's fast int8 kernel on CPUs without VNNI (U8S8 on vpmaddubsw)
    # sums pairs of u8 x s8 products in int16: with 8-bit weights they saturate (measured on AVX2: a MatMulInteger
    # off by 44% of its value; MiniLM probabilities off by up to 0.40), while VNNI CPUs compute them exactly, so
    # the same bundle scored differently per CPU. With |w| <= 64 a pair is at most 2 * 255 * 64 = 32640 < 2^15:
    # exact on every ISA (tests/test_quant_numerics.py). Issue 15 measured, MiniLM sentiment on AVX2 without VNNI
    # (1 thread): 0.83x the latency of unsigned weights (U8U8, exact too, but on the 16-bit kernel) at b8 s128,
    # 0.88x at b1 s128; on the 192 eval texts max |dp| 0.262 vs 0.351 and mean KL 4.5e-3 vs 4.0e-3, accuracy
    # 0.870 vs 0.865. Per-tensor 7-bit weights lost far more (max |dp| 0.77).
    # The "run pre-processing" hint onnxruntime logs on the root logger does not apply to dynamic mode,
    # so it is filtered out for the duration of the call.
    root = logging.getLogger()
    hint = _DropMessage("pre-processing before quantization")
    root.addFilter(hint)
    try:
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, reduce_range=True,
            use_external_data_format=external,
            # Shape inference cannot type the outputs of onnxruntime's fused ops (SkipLayerNormalization...).
            extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
        )
    finally:
        root.removeFilter(hint)


class _DropMessage(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in record.getMessage()


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


def quantize_all(stages: Stages, fp32: OnnxArtifact, modes: tuple[str, ...], staging: Path, decoder: bool,
                 block_size: int = DEFAULT_INT4_BLOCK, int4_embedding: bool = False,
                 adapter_modules: tuple[str, ...] = ()) -> dict[str, OnnxArtifact]:
    """The fp32 artifact and one quantized artifact per mode, as the variants of a bundle."""
    artifacts = {"fp32": fp32}
    for mode in modes:
        artifacts[mode] = stages.run(f"quantize_{mode}", f"quantizing ({mode})",
                                     lambda m=mode: quantize(fp32, m, staging, decoder=decoder, block_size=block_size,
                                                             int4_embedding=int4_embedding,
                                                             adapter_modules=adapter_modules))
    return artifacts
