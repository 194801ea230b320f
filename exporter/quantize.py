"""Quantized variants of the fp32 graph, torch-free: int8.py (encoders), weightonly.py (decoders), onnxruntime's fp16 converter."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ExporterError, UnsupportedError
from .formats import VARIANT_FILES
from .onnx_export import OnnxArtifact
from .stages import Stages

QUANTIZE_MODES = ("int8", "fp16", "int4")
DEFAULT_INT4_BLOCK = 32
# Encoder int8 weights: auto tries signed7 (the fast kernel) and keeps it where it passes its gate, else
# unsigned (twice the resolution); the other two force one. Why: see _int8.
INT8_WEIGHTS = ("auto", "signed7", "unsigned")
INT8_DTYPES = {"signed7": "int8-dynamic-per-channel-u8s7", "unsigned": "int8-dynamic-per-channel-u8u8"}


def first_int8_weights(int8_weights: str) -> str:
    """The weights an encoder's int8 is quantized with first (auto: signed7, and unsigned if that fails)."""
    return "signed7" if int8_weights == "auto" else int8_weights


def variant_dtype(mode: str, *, decoder: bool, block_size: int = DEFAULT_INT4_BLOCK,
                  int4_embedding: bool = False, int8_weights: str = "auto") -> str:
    """What a variant holds, as recorded in the manifest (``variants.NAME.dtype``)."""
    from .weightonly import INT8_BLOCK

    if mode == "int8":
        return f"int8-weight-only-block{INT8_BLOCK}" if decoder else INT8_DTYPES[first_int8_weights(int8_weights)]
    if mode == "int4":
        return f"int4-weight-only-block{block_size}-min-offset" + ("-int4-embedding" if int4_embedding else "")
    return {"fp32": "float32", "fp16": "float16"}[mode]


def quantize(fp32: OnnxArtifact, mode: str, out_dir: Path, *, decoder: bool, block_size: int = DEFAULT_INT4_BLOCK,
             int4_embedding: bool = False, adapter_modules: tuple[str, ...] = (),
             int8_weights: str = "auto") -> OnnxArtifact:
    """One quantized variant of the fp32 graph. Decoders get weight-only int8/int4, encoders dynamic int8.

    ``adapter_modules``: names of the modules a merged adapter changed (q_proj, ...); int4 keeps them at 8 bits.
    ``int8_weights``: one of INT8_WEIGHTS (encoders); auto quantizes with signed7, see retry_unsigned_int8.
    """
    if mode not in QUANTIZE_MODES:
        raise UnsupportedError(f"quantize mode {mode!r} is not supported; use one of: {', '.join(QUANTIZE_MODES)}, none")
    path = out_dir / VARIANT_FILES[mode]
    external = bool(fp32.data_files)
    try:
        if mode == "int8" and not decoder:
            _int8(fp32.path, path, external, first_int8_weights(int8_weights))
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


def _int8(src: Path, dst: Path, external: bool, weights: str) -> None:
    from .int8 import quantize_dynamic_int8

    # Dynamic per-channel int8 for encoders: 2-4x faster than torch eager; full static QDQ gave wrong labels.
    # Full-range signed weights (onnxruntime's default U8S8) are not used: on CPUs without VNNI they run on
    # vpmaddubsw, whose int16 pair sums saturate (measured on AVX2: a MatMulInteger off by 44% of its value,
    # MiniLM probabilities off by up to 0.40), while VNNI CPUs compute them exactly, so the same bundle scored
    # differently per CPU. Both formats used here are exact on every ISA (tests/test_quant_numerics.py):
    # - signed7 (|w| <= 64) runs on the fast u8 x s8 kernels. MiniLM b8 s128, one thread, relative to torch
    #   eager: 0.50x against unsigned's 1.12x on an AVX-512 AMX Xeon; 0.83x unsigned's latency on AVX2 EPYC.
    # - unsigned (U8U8) has twice the resolution but runs on the u8 x u8 kernel, no faster than fp32 on the
    #   Xeon. bench_gates.py's 3-label classifier (LoRA on q/k/v/dense, a fitted head, an adapter int8 barely
    #   keeps: unsigned keeps 0.66 of its effect) sits on the gate's margin with signed7: it lost 1 of its 14
    #   clear-margin argmaxes (as with full-range int8) before layer norms were written out as primitive ops,
    #   and keeps all 14 after (outputs 2.4e-6 apart). So auto keeps signed7 where it passes the gate and
    #   falls back to unsigned where it does not (retry_unsigned_int8); the gate is not loosened.
    counts = quantize_dynamic_int8(src, dst, external, weights)
    if not counts["matmul"]:
        raise ExporterError("int8: the graph has no MatMul or Gemm with a constant weight to quantize")


def _fp16(src: Path, dst: Path, external: bool) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # onnxruntime's converter (keep_io_types) works where onnxconverter-common's produced broken graphs. It
    # converts the If branches of fusions.skip_zero_masks too.
    model = onnx.load(str(src))
    model16 = convert_float_to_float16(model, keep_io_types=True)
    if external:
        onnx.save(model16, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")
    else:
        onnx.save(model16, str(dst))


def quantize_all(stages: Stages, fp32: OnnxArtifact, modes: tuple[str, ...], staging: Path, decoder: bool,
                 block_size: int = DEFAULT_INT4_BLOCK, int4_embedding: bool = False,
                 adapter_modules: tuple[str, ...] = (), int8_weights: str = "auto") -> dict[str, OnnxArtifact]:
    """The fp32 artifact and one quantized artifact per mode, as the variants of a bundle."""
    artifacts = {"fp32": fp32}
    for mode in modes:
        artifacts[mode] = stages.run(f"quantize_{mode}", f"quantizing ({mode})",
                                     lambda m=mode: quantize(fp32, m, staging, decoder=decoder, block_size=block_size,
                                                             int4_embedding=int4_embedding,
                                                             adapter_modules=adapter_modules,
                                                             int8_weights=int8_weights))
    return artifacts


def retry_unsigned_int8(stages: Stages, fp32: OnnxArtifact, artifacts: dict[str, OnnxArtifact],
                        manifest: dict[str, Any], results: dict[str, dict[str, Any]], staging: Path, *,
                        decoder: bool, int8_weights: str,
                        rejudge: Callable[[], dict[str, Any]]) -> str | None:
    """auto: an encoder int8 with signed7 weights that failed its gate is quantized again with unsigned
    weights, recorded in the manifest, and judged again by ``rejudge`` (its new result). Returns the warning
    that says so, or None where nothing was retried."""
    if decoder or int8_weights != "auto" or "int8" not in artifacts or results["int8"]["passed"]:
        return None
    first = "; ".join(results["int8"]["failures"])[:400]
    artifacts["int8"] = stages.run("quantize_int8_unsigned", "int8 with 7-bit signed weights failed its gate; "
                                   "quantizing again with unsigned weights",
                                   lambda: quantize(fp32, "int8", staging, decoder=False, int8_weights="unsigned"))
    manifest["variants"]["int8"]["dtype"] = INT8_DTYPES["unsigned"]
    results["int8"] = rejudge()
    outcome = "it passed" if results["int8"]["passed"] else "it failed too"
    return (f"int8: 7-bit signed weights (the fast kernel) failed the gate ({first}); re-quantized with unsigned "
            f"weights and {outcome}. Unsigned int8 runs up to 2x slower on VNNI/AMX CPUs; --int8-weights "
            "signed7 forces the fast format")
