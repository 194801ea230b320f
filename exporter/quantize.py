"""Quantized variants of the fp32 graph, torch-free: int8.py (encoders), weightonly.py (decoders), onnxruntime's fp16 converter."""

from __future__ import annotations

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
        return f"int8-weight-only-block{INT8_BLOCK}" if decoder else "int8-dynamic-per-channel-u8u8"
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
    from .int8 import quantize_dynamic_u8u8

    # Dynamic per-channel int8 for encoders: 2-4x faster than torch eager; full static QDQ gave wrong labels.
    # Weights are unsigned (U8U8): the default signed weights (U8S8) run on vpmaddubsw on CPUs without VNNI,
    # whose int16 pair sums saturate (measured on AVX2: a MatMulInteger off by 44% of its value; MiniLM
    # probabilities off by up to 0.40, tiny token classifiers failing their gate), while VNNI CPUs compute
    # them exactly, so the same bundle scored differently per CPU. U8U8 kernels are exact on every ISA
    # (tests/test_quant_numerics.py). Issue 15 measured the way out of the slower kernel: 7-bit signed weights
    # (reduce_range, |w| <= 64) are exact on the fast U8S8 kernel and ran 0.83x U8U8's latency at b8 s128 on
    # AVX2, but benchmarks/bench_gates.py's 3-label classifier (LoRA on q/k/v/dense, fitted head) then kept only
    # 0.93 of its clear-margin argmaxes (gate 0.98): a false reject U8U8 does not have. So U8U8 stays.
    # The graph and weights are onnxruntime's quantize_dynamic(per_channel=True, weight_type=QUInt8), made in
    # one vectorised pass (int8.py).
    counts = quantize_dynamic_u8u8(src, dst, external)
    if not counts["matmul"]:
        raise ExporterError("int8: the graph has no MatMul or Gemm with a constant weight to quantize")


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
