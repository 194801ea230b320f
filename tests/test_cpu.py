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


def test_an_emulated_arm_cpu_does_not_report_the_x86_hosts_model(monkeypatch):
    """qemu-user shows the host's x86 /proc/cpuinfo to an aarch64 process (measured with scripts/arm64-verify.sh:
    the report said "AMD EPYC" for a Cortex-A53)."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    host = "vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: sse4_2 avx avx2\n"
    f = cpu_features(host, detected={"ASIMD": True, "ASIMDDP": False})
    assert f["model"] == "emulated aarch64 (host: AMD EPYC)"
    assert f["features"] == ["asimd"] and f["isa"] == "aarch64 NEON (no dotprod)"
    native = "processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0b\n"
    assert cpu_features(native, detected={"ASIMD": True, "ASIMDDP": True})["model"] == "0xd0b"
