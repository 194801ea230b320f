"""The CPU a bundle is verified on, as the manifest records it and verify reports it."""

from __future__ import annotations

from exporter.cpu import cpu_features, isa_summary

SPR = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: sse4_2 avx avx2 fma avx512f avx512bw avx_vnni amx_int8\n"


def test_isa_summary_names_the_levels_people_compare():
    assert isa_summary("x86_64", ["sse4_2", "avx", "avx2", "fma"]) == "x86_64 AVX2 (no AVX-512, no VNNI)"
    assert isa_summary("x86_64", ["avx2", "avx512f", "avx512_vnni"]) == "x86_64 AVX-512 (VNNI)"
    assert isa_summary("x86_64", ["sse4_2"]) == "x86_64 SSE4.2 (no AVX-512, no VNNI)"
    assert isa_summary("aarch64", ["asimd"]) == "aarch64 NEON (no dotprod)"
    assert isa_summary("aarch64", ["asimd", "asimddp", "i8mm"]) == "aarch64 NEON (dotprod, i8mm)"


def test_runtime_detection_wins_over_a_cpuinfo_that_says_more(monkeypatch):
    """Under emulation /proc/cpuinfo is the host's: the features are what the CPU answers (numpy's cpuid)."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    emulated = {"SSE42": True, "AVX": False, "AVX2": False, "AVX512F": False}
    f = cpu_features(SPR, detected=emulated)
    assert f["features"] == ["sse4_2"] and f["isa"].startswith("x86_64 SSE4.2")
    native = {"SSE42": True, "AVX": True, "AVX2": True, "FMA3": True, "AVX512F": True, "AVX512BW": True}
    f = cpu_features(SPR, detected=native)
    assert f["features"] == ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx_vnni", "amx_int8"]
    assert f["isa"] == "x86_64 AVX-512 (VNNI, AMX)" and f["model"].startswith("Intel")


def test_this_machine_reports_something_comparable():
    f = cpu_features()
    assert f["machine"] and isinstance(f["features"], list) and f["isa"].startswith(f["machine"])
