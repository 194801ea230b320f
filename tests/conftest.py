from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import venv
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# exporter/graph_cache.py: each test session starts with an empty cache of its own (CLI subprocesses inherit it),
# so no result depends on what an earlier run or the user's own exports left in ~/.cache.
os.environ["EXPORT_ADAPTER_GRAPH_CACHE"] = tempfile.mkdtemp(prefix="export-adapter-graphs-")


@pytest.fixture(scope="session")
def factory(tmp_path_factory):
    """Session cache of tiny bases, adapters and exported bundles, keyed by what they are."""
    from helpers import make_adapter, make_base

    from exporter.pipeline import ExportSpec, run_pipeline

    root = tmp_path_factory.mktemp("models")
    cache: dict = {}

    class Factory:
        root_dir = root

        def base(self, arch: str) -> Path:
            key = ("base", arch)
            if key not in cache:
                cache[key] = make_base(arch, root / f"base-{arch}")
            return cache[key]

        def adapter(self, arch: str, task: str) -> Path:
            key = ("adapter", arch, task)
            if key not in cache:
                cache[key] = make_adapter(self.base(arch), arch, task, root / f"adapter-{arch}-{task}")
            return cache[key]

        def decoder_base(self, arch: str) -> Path:
            from helpers import make_decoder_base

            key = ("decoder_base", arch)
            if key not in cache:
                cache[key] = make_decoder_base(arch, root / f"dbase-{arch}")
            return cache[key]

        def decoder_adapter(self, arch: str) -> Path:
            from helpers import make_decoder_adapter

            key = ("decoder_adapter", arch)
            if key not in cache:
                cache[key] = make_decoder_adapter(self.decoder_base(arch), arch, root / f"dadapter-{arch}")
            return cache[key]

        def decoder_bundle(self, arch: str, quantize=("int8", "int4", "fp16")):
            key = ("decoder_bundle", arch, tuple(quantize))
            if key not in cache:
                out = root / f"dbundle-{arch}-{'-'.join(quantize)}"
                report = run_pipeline(ExportSpec(adapter=self.decoder_adapter(arch), out=out,
                                                 quantize=tuple(quantize)))
                cache[key] = (out, report)
            return cache[key]

        def swap_adapters(self, family: str) -> list[Path]:
            """Two adapters of different ranks (4 and 8) on one base: bert classifier or llama decoder."""
            from helpers import make_adapter, make_decoder_adapter

            key = ("swap_adapters", family)
            if key not in cache:
                if family == "decoder":
                    cache[key] = [make_decoder_adapter(self.decoder_base("llama"), "llama", root / f"swap-dec-r{r}",
                                                       r=r, seed=r) for r in (4, 8)]
                else:
                    cache[key] = [make_adapter(self.base("bert"), "bert", "text-classification",
                                               root / f"swap-cls-r{r}", r=r, seed=r) for r in (4, 8)]
            return cache[key]

        def swap_bundle(self, family: str):
            """The two swap_adapters exported with --keep-adapters (int8, and int4 for the decoder)."""
            key = ("swap_bundle", family)
            if key not in cache:
                out = root / f"swap-bundle-{family}"
                first, second = self.swap_adapters(family)
                quantize = ("int8", "int4") if family == "decoder" else ("int8", "fp16")
                report = run_pipeline(ExportSpec(adapter=first, out=out, quantize=quantize, keep_adapters=True,
                                                 adapters=(("first", first), ("second", second))))
                cache[key] = (out, report)
            return cache[key]

        def bundle(self, arch: str, task: str, quantize=("int8", "fp16")):
            key = ("bundle", arch, task, tuple(quantize))
            if key not in cache:
                out = root / f"bundle-{arch}-{task}-{'-'.join(quantize)}"
                report = run_pipeline(ExportSpec(adapter=self.adapter(arch, task), out=out, quantize=tuple(quantize)))
                cache[key] = (out, report)
            return cache[key]

    return Factory()


@pytest.fixture()
def bundle(factory, tmp_path):
    """A private copy of the tiny bert classifier bundle, free to damage."""
    import shutil

    out, _ = factory.bundle("bert", "text-classification")
    b = tmp_path / "b"
    shutil.copytree(out, b)
    return b


# --- other runtimes, for the consumers tests (issue 14) ---------------------------------------------------------

CONSUMERS = Path(os.environ.get("EXPORT_ADAPTER_CACHE", Path.home() / ".cache" / "export-adapter")) / "consumers"
REQUIRE_CONSUMERS = os.environ.get("EXPORT_ADAPTER_REQUIRE_CONSUMERS") == "1"


def _missing(what: str) -> None:
    if REQUIRE_CONSUMERS:
        pytest.fail(f"{what} (EXPORT_ADAPTER_REQUIRE_CONSUMERS=1)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """@huggingface/transformers installed once into the cache (its onnxruntime-node binaries are in the
    package, so the postinstall download is skipped)."""
    if not (shutil.which("node") and shutil.which("npm")):
        _missing("node and npm are not installed (apt install nodejs npm)")
    root = CONSUMERS / "transformers-js"
    if not (root / "node_modules" / "@huggingface" / "transformers" / "package.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        (root / "package.json").write_text('{"name": "consumers", "private": true, "type": "module"}')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "@huggingface/transformers@4"], cwd=root,
                           env={**os.environ, "ONNXRUNTIME_NODE_INSTALL": "skip"}, capture_output=True, text=True,
                           timeout=900)
        if r.returncode:
            _missing(f"npm install @huggingface/transformers failed: {r.stderr[-300:]}")
    return root


def _side_venv(name: str, probe: str, packages: list[str]) -> Path:
    """A venv of its own in the cache for a consumer that pins other versions than ours; made once."""
    root = CONSUMERS / name
    python = root / "bin" / "python"
    if not python.is_file() or subprocess.run([str(python), "-c", probe], capture_output=True).returncode:
        venv.create(root, with_pip=True, clear=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True,
                           timeout=1500)
        if r.returncode:
            _missing(f"pip install {' '.join(packages)} failed: {r.stderr[-300:]}")
    return python


@pytest.fixture(scope="session")
def genai_python() -> Path:
    """onnxruntime-genai in a side venv (it pins its own onnxruntime)."""
    return _side_venv("genai-venv", "import onnxruntime_genai", ["onnxruntime-genai==0.18.0"])


@pytest.fixture(scope="session")
def optimum_python() -> Path:
    """optimum's ORTModel classes in a side venv with transformers 4.57 (torch pinned to the local CPU wheel)."""
    # optimum-onnx needs its [onnxruntime] extra, and optimum.onnxruntime imports lazily: the probe loads the
    # class the tests use, so a venv without onnxruntime (seen on a clean cache) is rebuilt, not reused.
    import onnxruntime

    return _side_venv("optimum-venv", "from optimum.onnxruntime import ORTModelForSequenceClassification; "
                      "import transformers; assert transformers.__version__.startswith('4.57')",
                      ["torch==2.13.0", "transformers==4.57.*", "optimum-onnx[onnxruntime]==0.1.0",
                       f"onnxruntime=={onnxruntime.__version__}"])


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's headless Chromium (apt install chromium): the browser the web sample is proven in."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return Path(found)
    _missing("chromium is not installed (apt install chromium)")
