"""The CPU a bundle is verified on: architecture and the instruction-set features that pick onnxruntime's kernels.

Quantized variants use only kernels whose integer arithmetic is exact on every ISA (see weightonly.py and
quantize.py), so their numbers should not depend on the CPU; float reductions still differ in their last bits
between AVX2, AVX-512 and NEON code paths. The manifest records the exporting CPU, and ``verify`` reports the
device's, so a reviewer can see where each verdict was reached. Torch-free.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

# The features that select onnxruntime's CPU kernels (MLAS): x86 ISA levels, VNNI/AMX int8 paths, ARM dot
# product / matrix multiply and fp16 arithmetic.
_X86 = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
        "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
_ARM = ("asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2")


# Our names -> numpy's runtime (cpuid / HWCAP) feature names. numpy asks the CPU itself, so it is right under
# emulation too (qemu-user passes the host's /proc/cpuinfo through); /proc/cpuinfo only adds what numpy does
# not list, and only on top of the features it builds on.
_NUMPY = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "f16c": "F16C", "avx512f": "AVX512F",
          "avx512bw": "AVX512BW", "avx512vl": "AVX512VL", "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16",
          "avx512_fp16": "AVX512FP16", "asimd": "ASIMD", "asimddp": "ASIMDDP", "asimdhp": "ASIMDHP", "fphp": "FPHP",
          "sve": "SVE"}
_EXTRA_NEEDS = {"avx_vnni": "avx2", "amx_tile": "avx512f", "amx_int8": "avx512f", "amx_bf16": "avx512f",
                "i8mm": "asimd", "bf16": "asimd", "sve2": "sve"}


def _numpy_features() -> dict[str, bool] | None:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features
        except ImportError:
            return None
    return dict(features)


def cpu_features(cpuinfo: str | None = None, detected: dict[str, bool] | None = None) -> dict[str, Any]:
    """{"machine", "model", "features", "isa"}: what the kernels of this CPU can use."""
    machine = platform.machine().lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    known = _X86 if machine in ("x86_64", "amd64", "i686", "x86") else _ARM
    detected = _numpy_features() if detected is None else detected
    if detected:
        present = [f for f in known if f in _NUMPY and detected.get(_NUMPY[f])]
        present += [f for f in known if f in _EXTRA_NEEDS and f in flags and _EXTRA_NEEDS[f] in present]
        present = [f for f in known if f in present]
    else:
        present = [f for f in known if f in flags]
    model = fields.get("model name") or fields.get("cpu part") or platform.processor()
    if known is _ARM and "vendor_id" in fields:
        # qemu-user passes the x86 host's /proc/cpuinfo through: its model is not this (emulated) CPU's.
        model = f"emulated aarch64 (host: {model})"
    return {"machine": machine, "model": model, "features": present, "isa": isa_summary(machine, present)}


def isa_summary(machine: str, features: list[str]) -> str:
    """One line a person can compare: e.g. "x86_64 AVX2 (no AVX-512, no VNNI)"."""
    f = set(features)
    if machine in ("x86_64", "amd64"):
        level = "AVX-512" if "avx512f" in f else "AVX2" if "avx2" in f else "AVX" if "avx" in f else "SSE4.2" \
            if "sse4_2" in f else "baseline"
        vnni = "avx512_vnni" in f or "avx_vnni" in f
        extra = [] if level == "AVX-512" else ["no AVX-512"]
        extra.append("VNNI" if vnni else "no VNNI")
        if "amx_int8" in f:
            extra.append("AMX")
        return f"{machine} {level} ({', '.join(extra)})"
    if machine in ("aarch64", "arm64"):
        names = [n for n, k in (("dotprod", "asimddp"), ("i8mm", "i8mm"), ("fp16", "asimdhp"), ("SVE", "sve"))
                 if k in f]
        return f"{machine} NEON" + (f" ({', '.join(names)})" if names else " (no dotprod)")
    return machine
