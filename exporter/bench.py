"""``export-adapter bench``: how fast each variant of a bundle runs on this CPU, and what it costs (torch-free).

Latency is measured with every variant loaded in one process and the variants interleaved (one call of each
per case per round), so drift from other work on the machine hits them alike; p50 and p90 are over the
rounds after the warm-up. Session load time and peak RSS come from a fresh child process per variant (load,
then one call of every case), so each number is that variant's alone. Inputs are synthetic: token ids drawn
from the vocabulary and a random KV cache (a dense graph's time does not depend on the values). A decode step
runs as ``generate`` runs it: on graphs that append to their KV buffers (``runtime.in_place_cache``), bound to
one buffer per layer, so the step's time is not a copy of the whole cache.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import read_manifest
from .cpu import cpu_features
from .errors import BundleError, UsageError, UserInputError
from .generation import DecoderIO
from .runtime import (
    KVBuffers,
    activate_adapter,
    bundle_session_config,
    bundle_tokenizer,
    check_members,
    graph_file,
    in_place_cache,
    make_session,
)
from .tasks import family_of

DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 16), (1, 128), (8, 128))
DEFAULT_CONTEXTS: tuple[int, ...] = (128,)
_ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
              "tensor(float16)": np.float16}


@dataclass(frozen=True)
class BenchSpec:
    bundle: Path
    variants: tuple[str, ...] = ()
    shapes: tuple[tuple[int, int], ...] = ()  # encoders: (batch, sequence); () = DEFAULT_SHAPES
    contexts: tuple[int, ...] = ()  # decoders: a prefill of this many tokens, one step after as many; () = default
    rounds: int = 20
    warmup: int = 3
    threads: int | None = None
    session_config: tuple[tuple[str, str], ...] = ()
    adapter: str | None = None
    ort_format: bool = False
    memory: bool = True


@dataclass(frozen=True)
class Case:
    """One timed call: ``batch`` sequences of ``tokens`` new tokens after ``past`` cached ones."""

    name: str
    kind: str  # encode | prefill | decode
    batch: int
    tokens: int
    past: int = 0

    @property
    def unit(self) -> str:
        return "seq/s" if self.kind == "encode" else "tok/s"

    def throughput(self, seconds: float) -> float:
        return (self.batch if self.kind == "encode" else self.batch * self.tokens) / seconds


@dataclass
class _Loaded:
    session: Any
    calls: dict[str, Callable[[], Any]] = field(default_factory=dict)  # one timed call per case name


def cases_for(manifest: dict[str, Any], spec: BenchSpec) -> list[Case]:
    if family_of(manifest).is_decoder:
        if spec.shapes:
            raise UsageError("--shape times encoders; this is a decoder bundle: pass --context N")
        limit = int(manifest["generation"].get("context_length", 2048))
        contexts = spec.contexts or DEFAULT_CONTEXTS
        bad = [c for c in contexts if c < 1 or c + 1 > limit]
        if bad:
            raise UsageError(f"--context {bad[0]}: this decoder's context is {limit} tokens; pass 1..{limit - 1}")
        out = []
        for c in contexts:
            out += [Case(f"prefill {c}", "prefill", 1, c), Case(f"decode @{c}", "decode", 1, 1, c)]
        return out
    if spec.contexts:
        raise UsageError(f"--context times decoders; this is a {manifest['task']} bundle: pass --shape BxS")
    limit = int((manifest.get("tokenizer") or {}).get("max_length") or 512)
    shapes = spec.shapes or DEFAULT_SHAPES
    bad = [(b, s) for b, s in shapes if b < 1 or s < 1 or s > limit]
    if bad:
        raise UsageError(f"--shape {bad[0][0]}x{bad[0][1]}: sequences of 1..{limit} tokens (the bundle's "
                         "max_length), batch >= 1")
    return [Case(f"b{b} s{s}", "encode", b, s) for b, s in shapes]


def _vocab_size(root: Path, manifest: dict[str, Any]) -> int:
    if manifest.get("tokenizer"):
        return int(bundle_tokenizer(root, manifest).get_vocab_size())
    return 100  # no tokenizer in the bundle: any small id is in every vocabulary


def make_feeds(session, case: Case, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the case's shape for every graph input this session requires."""
    rng = np.random.default_rng(seed)
    b, s, past = case.batch, case.tokens, case.past
    feeds: dict[str, np.ndarray] = {}
    for i in session.get_inputs():
        dtype = _ORT_TYPES.get(i.type)
        if dtype is None:
            raise BundleError(f"{i.name}: bench cannot feed an input of type {i.type}")
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, vocab, (b, s)).astype(dtype)
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones((b, past + s), dtype)
        elif i.name == "token_type_ids":
            feeds[i.name] = np.zeros((b, s), dtype)
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(past, past + s), (b, s)).astype(dtype)
        elif i.name.startswith("past_key_values.") and len(i.shape) == 4 and isinstance(i.shape[1], int) \
                and isinstance(i.shape[3], int):
            feeds[i.name] = rng.standard_normal((b, i.shape[1], past, i.shape[3])).astype(dtype)
        else:
            raise BundleError(f"{i.name}: bench does not know what to feed this input")
    return feeds


def _load(root: Path, manifest: dict[str, Any], variant: str, spec: BenchSpec, cases: list[Case],
          vocab: int, run_options=None) -> _Loaded:
    entry = manifest["variants"][variant]
    session = make_session(root / graph_file(root, entry, spec.ort_format), threads=spec.threads,
                           config=bundle_session_config(manifest, dict(spec.session_config)))
    return _Loaded(session, _case_calls(session, manifest, variant, cases, vocab, run_options))


def _case_calls(session, manifest: dict[str, Any], variant: str, cases: list[Case], vocab: int,
                run_options=None) -> dict[str, Callable[[], Any]]:
    """One call per case, as ``generate`` would run it."""
    calls: dict[str, Callable[[], Any]] = {}
    for c in cases:
        feeds = make_feeds(session, c, vocab)
        if c.kind == "decode" and in_place_cache(manifest, variant):
            io = DecoderIO.from_json(manifest["decoder"])
            kv = KVBuffers(session, io, run_options)
            kv.load([feeds.pop(n) for n in io.past_names], c.past + c.tokens)
            # Every call writes its step at the same position: the same work each round.
            calls[c.name] = lambda kv=kv, f=feeds: kv.run(f)
        else:
            calls[c.name] = lambda f=feeds: session.run(None, f, run_options)
    return calls


def _percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


def _child_measure(request: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load one variant and run every case once; its load time and peak RSS."""
    spec = BenchSpec(Path(request["bundle"]), threads=request["threads"],
                     session_config=tuple(tuple(kv) for kv in request["session_config"]),
                     ort_format=request["ort_format"], adapter=request["adapter"])
    root = spec.bundle
    manifest = read_manifest(root)
    cases = [Case(**c) for c in request["cases"]]
    vocab = _vocab_size(root, manifest)
    active = activate_adapter(root, manifest, spec.adapter)
    t0 = time.perf_counter()
    loaded = _load(root, manifest, request["variant"], spec, [], vocab)
    load_s = time.perf_counter() - t0
    options = active.run_options if active else None
    for call in _case_calls(loaded.session, manifest, request["variant"], cases, vocab, options).values():
        call()
    import resource  # POSIX; the parent skips memory where it is missing

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"load_s": load_s, "peak_rss_mb": peak}


def child_main() -> None:
    """The fresh process of ``_memory``: a request on stdin, its measurement as JSON on stdout."""
    print(json.dumps(_child_measure(json.loads(sys.stdin.read()))))


def _memory(root: Path, variant: str, spec: BenchSpec, cases: list[Case]) -> dict[str, Any]:
    request = {"bundle": str(root), "variant": variant, "threads": spec.threads,
               "session_config": [list(kv) for kv in spec.session_config], "ort_format": spec.ort_format,
               "adapter": spec.adapter, "cases": [c.__dict__ for c in cases]}
    proc = subprocess.run([sys.executable, "-c", "from exporter.bench import child_main; child_main()"],
                          input=json.dumps(request), capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise BundleError(f"{variant}: the memory measurement's child process failed ({last[:200]})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(spec: BenchSpec, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    if spec.rounds < 1 or spec.warmup < 0:
        raise UsageError("--rounds must be >= 1 and --warmup >= 0")
    root = spec.bundle
    manifest = read_manifest(root)
    available = list(manifest["variants"])
    variants = list(spec.variants) or available
    unknown = [v for v in variants if v not in available]
    if unknown:
        raise UserInputError(f"{root}: no variant {unknown[0]!r}; this bundle has {', '.join(available)}")
    for v in variants:
        check_members(root, manifest, v)
    cases = cases_for(manifest, spec)
    vocab = _vocab_size(root, manifest)
    active = activate_adapter(root, manifest, spec.adapter)
    options = active.run_options if active else None

    info: dict[str, dict[str, Any]] = {}
    for v in variants:
        entry = manifest["variants"][v]
        files = [graph_file(root, entry, spec.ort_format), *([] if spec.ort_format else entry.get("data_files", []))]
        info[v] = {"file": files[0], "size_mb": sum((root / f).stat().st_size for f in files) / 2**20}
        if spec.memory and sys.platform != "win32":
            progress(f"bench: {v}: session load and peak RSS in a fresh process")
            info[v].update(_memory(root, v, spec, cases))
    loaded = {}
    for v in variants:
        progress(f"bench: loading {v}")
        loaded[v] = _load(root, manifest, v, spec, cases, vocab, options)

    times: dict[tuple[str, str], list[float]] = {(v, c.name): [] for v in variants for c in cases}
    total = spec.warmup + spec.rounds
    for r in range(total):
        if r % 5 == 0 or r == total - 1:
            progress(f"bench: round {r + 1}/{total}" + (" (warm-up)" if r < spec.warmup else ""))
        for c in cases:
            for v in variants:
                call = loaded[v].calls[c.name]
                t0 = time.perf_counter()
                call()
                dt = time.perf_counter() - t0
                if r >= spec.warmup:
                    times[(v, c.name)].append(dt)

    rows = []
    for c in cases:
        base = statistics.median(times[("fp32", c.name)]) if "fp32" in variants else None
        for v in variants:
            t = times[(v, c.name)]
            p50 = statistics.median(t)
            rows.append({"variant": v, "case": c.name, "kind": c.kind, "batch": c.batch, "tokens": c.tokens,
                         "past": c.past, "p50_ms": p50 * 1e3, "p90_ms": _percentile(t, 90) * 1e3,
                         "throughput": c.throughput(p50), "unit": c.unit,
                         "vs_fp32": p50 / base if base else None})
    import onnxruntime as ort

    return {"bundle": str(root), "task": manifest["task"], "family": family_of(manifest).name,
            "cpu": cpu_features(), "onnxruntime": ort.__version__, "cores": os.cpu_count(),
            "threads": spec.threads, "session_config": bundle_session_config(manifest, dict(spec.session_config)),
            "adapter": spec.adapter,
            "ort_format": spec.ort_format, "rounds": spec.rounds, "warmup": spec.warmup, "inputs": "synthetic",
            "variants": info, "cases": rows}
