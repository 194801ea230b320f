"""Gates per task (issue 11): classification in probability space, embeddings by their similarity structure,
user thresholds (--tolerance) recorded and re-applied, verify --probe-texts, worst probes and the plot."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, run_export

from exporter.bundle import MANIFEST, file_hashes, read_manifest, write_manifest
from exporter.cli import cli
from exporter.parity import OutputInfo, _ranks, compare_variant, similarity_metrics
from exporter.tolerances import gate_for, threshold_problem

LOGITS = [OutputInfo("logits", False, True)]


def _judge(got, ref, task="text-classification", variant="int8"):
    masks = [np.ones((len(ref), 2), dtype=np.int64)]
    return compare_variant([{"logits": np.asarray(got, np.float32)}], [{"logits": np.asarray(ref, np.float32)}],
                           masks, LOGITS, gate_for(task, variant))


def test_near_zero_logit_row_is_judged_by_probabilities_not_cosine():
    """The issue's row: logits [-0.045, 0.078, -0.033] (norm 0.096) moved by int8-sized noise (0.05) has a
    negative cosine but changes no probability by more than ~0.03; a row with a clear winner keeps it."""
    ref = [[-0.045, 0.078, -0.033], [2.5, -1.0, -1.5], [-1.2, 3.0, -1.8]]
    got = [[0.005, 0.028, 0.017], [2.45, -0.95, -1.5], [-1.15, 2.95, -1.8]]
    r = _judge(got, ref)
    m = r["outputs"]["logits"]
    assert m["cosine_min"] < 0.6  # what the old per-row logit cosine gate (>= 0.99) refused
    assert m["prob_max_abs_diff"] < 0.05
    assert r["passed"], r["failures"]


def test_classification_gate_fails_a_real_probability_shift_and_names_it():
    ref = [[2.0, 0.0, -1.0], [0.0, 2.0, -1.0], [-1.0, 0.0, 2.0]]
    got = [[2.0, 0.0, -1.0], [0.0, 2.0, -1.0], [-1.0, 0.9, 1.4]]  # same argmax, p(top) 0.84 -> 0.60
    r = _judge(got, ref)
    assert not r["passed"]
    assert any("class probability changed by 0.2" in f or "mean KL" in f for f in r["failures"]), r["failures"]
    worst = r["outputs"]["logits"]["worst"]["prob_max_abs_diff"]
    assert (worst["batch"], worst["example"]) == (0, 2)
    assert abs(sum(worst["torch"]) - 1) < 1e-6 and len(worst["onnx"]) == 3  # probabilities shown


def test_fp16_classification_gate_keeps_the_cosine_on_rows_that_are_not_near_zero():
    ref = [[3.0, -3.0], [0.001, -0.002]]
    r = _judge([[3.0, -3.0], [0.0015, -0.0015]], ref, variant="fp16")  # the tiny row's cosine is noise
    assert r["passed"], r["failures"]
    assert r["outputs"]["logits"]["n_cosine_rows"] == 1
    # The large row turned by 5 degrees: probabilities barely move (0.0016), the cosine (0.9959) is the gate.
    r = _judge([[3.0, -2.5], [0.001, -0.002]], ref, variant="fp16")
    assert not r["passed"] and any("min cosine" in f for f in r["failures"]), r["failures"]


def _embeddings(n=8, dim=32, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 2, dim))
    # Pairs of near-duplicate texts: every text has one clear nearest neighbour.
    return np.concatenate([centres + 0.2 * rng.standard_normal(centres.shape),
                           centres + 0.2 * rng.standard_normal(centres.shape)])


def test_embedding_gate_passes_noise_and_fails_broken_neighbours():
    ref = _embeddings()
    rng = np.random.default_rng(1)
    info = [OutputInfo("sentence_embedding", False, False)]
    masks = [np.ones((len(ref), 2), dtype=np.int64)]
    gate = gate_for("feature-extraction", "int8")

    def judge(got):
        return compare_variant([{"sentence_embedding": got}], [{"sentence_embedding": ref}], masks, info, gate)

    ok = judge(ref + 0.03 * np.abs(ref).mean() * rng.standard_normal(ref.shape))
    m = ok["outputs"]["sentence_embedding"]
    assert ok["passed"], ok["failures"]
    assert m["n_texts"] == 8 and m["neighbour_agreement_clear"] == 1.0 and m["rank_correlation"] > 0.95
    # Swap two texts' vectors: each still has a perfect cosine to *some* reference row, but the neighbours move.
    swapped = ref.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    bad = judge(swapped)
    assert not bad["passed"]
    assert any("nearest-neighbour" in f or "min cosine" in f for f in bad["failures"])


def test_similarity_counts_each_text_once_when_batches_repeat_it():
    ref = _embeddings()
    twice = np.concatenate([ref, ref[:3]])  # the probe batches run texts 0-2 again, alone
    row_texts = [list(range(8)) + [0, 1, 2]]
    info = [OutputInfo("sentence_embedding", False, False)]
    masks = [np.ones((len(twice), 2), dtype=np.int64)]
    r = compare_variant([{"sentence_embedding": twice}], [{"sentence_embedding": twice}], masks, info,
                        gate_for("feature-extraction", "int8"), row_texts)
    assert r["outputs"]["sentence_embedding"]["n_texts"] == 8


def test_spearman_ranks_average_ties_and_similarity_needs_three_texts():
    assert _ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    assert similarity_metrics(np.ones((2, 4)), np.ones((2, 4)), 0.01) == {}


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 1e9])
def test_threshold_sanity(value):
    assert threshold_problem("max_prob_diff", value) is not None
    assert threshold_problem("min_cosine", 0.99) is None
    assert threshold_problem("min_cosine", 2.0) is not None
    assert threshold_problem("no_such_gate", 0.5) is not None


def test_tolerance_override_is_recorded_shown_and_applied_by_verify(factory, tmp_path):
    adapter = factory.adapter("bert", "text-classification")
    out = tmp_path / "loose"
    r = run_export(adapter, out, "--quantize", "int8", "--tolerance", "int8.max_prob_diff=0.5",
                   "--tolerance", "clear_margin_rel=0.3")
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    int8 = manifest["variants"]["int8"]
    assert int8["thresholds"]["max_prob_diff"] == 0.5 and int8["thresholds"]["clear_margin_rel"] == 0.3
    assert int8["user_tolerances"]["max_prob_diff"] == {"value": 0.5, "default": gate_for("text-classification",
                                                                                         "int8")["max_prob_diff"]}
    assert "user_tolerances" not in manifest["variants"]["fp32"]  # fp32 has no clear margin, nothing overridden
    md = (out / "parity.md").read_text()
    assert "Thresholds set by the user" in md and "int8: max_prob_diff = 0.5" in md and "*(yours; default" in md
    assert manifest["spec"]["tolerances"] == [["int8.max_prob_diff", 0.5], ["clear_margin_rel", 0.3]]
    # verify applies what the manifest records: a stricter recorded value fails the same graph.
    strict = tmp_path / "strict"
    shutil.copytree(out, strict)
    m = read_manifest(strict)
    m["variants"]["int8"]["thresholds"]["max_prob_diff"] = 0.0
    write_manifest(strict, m)
    v = CliRunner().invoke(cli, ["verify", str(strict), "--variant", "int8"])
    assert v.exit_code == 3 and "class probability changed" in v.output


@pytest.mark.parametrize("arg, code, needle", [
    ("int8.max_prob_dif=0.3", 1, "did you mean max_prob_diff"),
    ("int4.max_prob_diff=0.3", 1, "no variant 'int4'"),
    ("max_prob_diff=nan", 1, "not a finite number"),
    ("argmax_agreement=1.5", 1, "outside [-1, 1]"),
    ("max_prob_diff", 2, "expected [VARIANT.]NAME=NUMBER"),
])
def test_bad_tolerance_is_one_line_and_writes_nothing(factory, tmp_path, arg, code, needle):
    out = tmp_path / "b"
    r = run_export(factory.adapter("bert", "text-classification"), out, "--tolerance", arg)
    if code == 2:
        assert r.exit_code == 2 and needle in r.output and not out.exists()
    else:
        assert_clean_failure(r, out, needle)


def test_verify_refuses_a_manifest_with_a_non_finite_threshold(factory, tmp_path):
    """A NaN threshold would make every comparison false, so the gate would fail open: refused (exit 3)."""
    import hashlib

    out, _ = factory.bundle("bert", "text-classification")
    bad = tmp_path / "nan"
    shutil.copytree(out, bad)
    m = read_manifest(bad)
    m["variants"]["int8"]["thresholds"]["max_prob_diff"] = float("nan")
    (bad / MANIFEST).write_text(json.dumps(m))  # json writes NaN; our writer refuses to
    (bad / "manifest.json.sha256").write_text(hashlib.sha256((bad / MANIFEST).read_bytes()).hexdigest() + "  manifest.json\n")
    r = CliRunner().invoke(cli, ["verify", str(bad)])
    assert r.exit_code == 3, r.output
    assert "variants.int8.thresholds.max_prob_diff: not a finite number" in r.output


def test_parity_md_shows_worst_probes_with_text_and_the_plot_is_in_the_bundle(factory):
    out, _ = factory.bundle("bert", "text-classification")
    md = (out / "parity.md").read_text()
    assert "## Worst probes" in md
    report = json.loads((out / "parity.json").read_text())
    worst = report["variants"]["int8"]["outputs"]["logits"]["worst"]["prob_max_abs_diff"]
    assert worst["text"] and worst["text"][:40] in md
    svg = out / "report" / "errors.svg"
    assert report["plot"] == "report/errors.svg" and "report/errors.svg" in read_manifest(out)["files"]
    assert "![per-row error of each variant](report/errors.svg)" in md
    root = ElementTree.fromstring(svg.read_text(encoding="utf-8"))  # well-formed XML
    ns = "{http://www.w3.org/2000/svg}"
    texts = {t.text for t in root.iter(f"{ns}text")}
    # one panel per gated distribution: fp32's max |diff| and the quantized variants' max |Δp|
    assert {"fp32", "int8", "fp16", "max |onnx - torch| per row", "max |Δ probability| per row"} <= texts, texts
    lines = root.findall(f"{ns}polyline")
    assert len(lines) == 3 and all(len(p.get("points").split()) >= 10 for p in lines)
    dashed = [x for x in root.iter(f"{ns}line") if x.get("stroke-dasharray")]
    assert len(dashed) == 3  # each variant's threshold


def test_error_plot_escapes_names_from_the_bundle(tmp_path):
    """Output and variant names come from a bundle (untrusted): they are text in the SVG, never markup."""
    from exporter.plot import write_error_plot

    evil = '<script>alert(1)</script>&"'
    report = {"variants": {evil: {"thresholds": {"max_mean_kl": 0.02}, "outputs": {evil: {
        "distribution": {"metric": "kl", "quantiles": [0.0, 1e-4, 3e-3, float("nan"), 0.5]}}}}}}
    assert write_error_plot(report, tmp_path / "e.svg")
    root = ElementTree.fromstring((tmp_path / "e.svg").read_text(encoding="utf-8"))
    assert not root.findall(".//{http://www.w3.org/2000/svg}script")
    assert sum(t.text == evil for t in root.iter("{http://www.w3.org/2000/svg}text")) == 2
    assert not write_error_plot({"variants": {"fp32": {"thresholds": {}, "outputs": {"logits": {}}}}},
                                tmp_path / "none.svg")
    assert not (tmp_path / "none.svg").exists()
    # Malformed where parity never writes so: left out or drawn without what is wrong, never an exception, and
    # always well-formed XML (a control character in a name would break it).
    odd = {"variants": {
        "a\x01b": {"thresholds": {"max_mean_kl": 10 ** 400}, "outputs": {"out\x1f": {
            "distribution": {"metric": "kl", "quantiles": [1e-5, "x", None, float("inf"), 2e-3]}}}},
        "c": {"thresholds": "not a dict", "outputs": {"logits": {"distribution": {"metric": "kl", "quantiles": 3}}}},
        "d": "not a dict",
        "e": {"thresholds": {"max_prob_diff": True}, "outputs": {"logits": {
            "distribution": {"metric": "prob_max_abs_diff", "quantiles": [0.0, 0.1]}}}}}}
    assert write_error_plot(odd, tmp_path / "odd.svg")
    root = ElementTree.fromstring((tmp_path / "odd.svg").read_text(encoding="utf-8"))
    texts = {t.text for t in root.iter("{http://www.w3.org/2000/svg}text")}
    assert {"a?b", "out?", "e"} <= texts and "c" not in texts, texts
    assert not [x for x in root.iter("{http://www.w3.org/2000/svg}line") if x.get("stroke-dasharray")]


def test_verify_probe_texts_judges_quantized_variants_against_fp32(factory, tmp_path):
    out, _ = factory.bundle("bert", "text-classification")
    probes = tmp_path / "mine.txt"
    probes.write_text("the quick brown fox\nanother probe of my own domain\nok\n")
    r = CliRunner().invoke(cli, ["verify", str(out), "--probe-texts", str(probes), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    user = report["user_probes"]
    assert user["count"] == 3 and user["reference"] == "fp32" and set(user["variants"]) == {"int8", "fp16"}
    assert all(v["passed"] for v in user["variants"].values())
    texts = {w["text"] for v in user["variants"].values() for m in v["outputs"].values() for w in m["worst"].values()}
    assert texts <= {"the quick brown fox", "another probe of my own domain", "ok"}
    # A damaged int8 (the classifier's weights x50, the manifest re-hashed to match): the user's texts catch it.
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    shutil.copyfile(bad / "onnx/model.onnx", bad / "onnx/model_quantized.onnx")
    _scale_classifier(bad / "onnx/model_quantized.onnx", 50.0)
    m = read_manifest(bad)
    m["files"] = file_hashes(bad)
    write_manifest(bad, m)
    r = CliRunner().invoke(cli, ["verify", str(bad), "--probe-texts", str(probes)])
    assert r.exit_code == 3
    assert "your probes (mine.txt, vs fp32)" in r.output


def _scale_classifier(path, factor):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = next(i for i in model.graph.initializer if i.name.endswith("classifier.weight"))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * factor, init.name))
    onnx.save(model, str(path))


def test_verify_probe_texts_bad_file_is_one_line(factory, tmp_path):
    out, _ = factory.bundle("bert", "text-classification")
    r = CliRunner().invoke(cli, ["verify", str(out), "--probe-texts", str(tmp_path / "missing.txt")])
    assert r.exit_code == 1 and "missing.txt: probe file not found" in r.stderr and "Traceback" not in r.output


V1 = Path(__file__).parent / "data" / "bundle-v1"


def test_a_schema_1_bundle_still_verifies_with_the_thresholds_it_recorded(tmp_path):
    """tests/data/bundle-v1 was exported by 72fbe78 (schema 1: int8 gated by per-row cosine >= 0.99, rtol 1e-3,
    no base outputs): it verifies, and the gate applied is the one it recorded."""
    r = CliRunner().invoke(cli, ["verify", str(V1), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["schema_version"] == 1 and report["passed"]
    int8 = report["variants"]["int8"]
    assert int8["thresholds"] == {"min_cosine": 0.99, "argmax_agreement": 1.0, "clear_margin_rel": 0.2}
    assert "cosine_min_gated" not in int8["outputs"]["logits"]  # the old gate: every row's cosine
    assert "adapter_kept" not in int8["outputs"]["logits"]  # no base outputs in a v1 bundle
    import jsonschema

    from exporter.schema import MANIFEST_SCHEMA, REPORT_SCHEMA

    jsonschema.validate(read_manifest(V1), MANIFEST_SCHEMA)
    jsonschema.validate(report, REPORT_SCHEMA)
    # Its recorded gate bites: a stricter cosine than its int8 reaches fails it.
    strict = tmp_path / "v1"
    shutil.copytree(V1, strict)
    m = read_manifest(strict)
    m["variants"]["int8"]["thresholds"]["min_cosine"] = 0.999999
    write_manifest(strict, m)
    assert CliRunner().invoke(cli, ["verify", str(strict)]).exit_code == 3


def test_run_checks_tolerance_names_before_fine_tuning(factory, tmp_path):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r", factory.base("bert"), "text-classification")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out), "-q", "--tolerance", "int8.max_prob_dif=0.3"])
    assert_clean_failure(r, out, "did you mean max_prob_diff")
    assert not (tmp_path / ".out.adapter").exists()  # nothing was trained


def test_recipe_gates_reach_the_manifest_and_the_effective_recipe(factory, tmp_path):
    import yaml
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r", factory.base("bert"), "text-classification")
    data = yaml.safe_load(recipe.read_text())
    data["tolerances"]["gates"] = {"int8.max_mean_kl": 0.07}
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out), "-q", "--tolerance", "clear_margin_rel=0.25"])
    assert r.exit_code == 0, r.output
    int8 = read_manifest(out)["variants"]["int8"]
    assert int8["thresholds"]["max_mean_kl"] == 0.07 and int8["thresholds"]["clear_margin_rel"] == 0.25
    assert set(int8["user_tolerances"]) == {"max_mean_kl", "clear_margin_rel"}
    effective = yaml.safe_load((out / "recipe.yaml").read_text())
    assert effective["tolerances"]["gates"] == {"int8.max_mean_kl": 0.07, "clear_margin_rel": 0.25}


def test_adapter_kept_tells_a_lost_adapter_from_noise():
    """Noise 3x larger than the adapter's effect: the error metrics cannot tell a lost adapter from a kept one,
    the projection on the effect can (1 = merged, 0 = base)."""
    rng = np.random.default_rng(0)
    base = rng.standard_normal((40, 50, 4))
    merged = base + 0.1 * rng.standard_normal(base.shape)
    noise = 0.3 * rng.standard_normal(base.shape)
    info = [OutputInfo("logits", True, True)]
    masks = [np.ones((40, 50), dtype=np.int64)]
    gate = gate_for("token-classification", "int8")

    def judge(got):
        return compare_variant([{"logits": got}], [{"logits": merged}], masks, info, gate, None, [{"logits": base}])

    kept = judge(merged + noise)
    lost = judge(base + noise)
    assert abs(kept["outputs"]["logits"]["adapter_kept"] - 1) < 0.1
    assert abs(lost["outputs"]["logits"]["adapter_kept"]) < 0.1
    assert not any("adapter's effect" in f for f in kept["failures"])
    assert any("keeps 0.0" in f and "adapter was lost" in f for f in lost["failures"]), lost["failures"]


def test_bundle_stores_base_outputs_and_reports_adapter_kept(factory):
    out, report = factory.bundle("bert", "text-classification")
    assert read_manifest(out)["reference"]["base_outputs"] == "reference/base_outputs.npz"
    assert (out / "reference" / "base_outputs.npz").exists()
    kept = report.data["variants"]["int8"]["outputs"]["logits"]["adapter_kept"]
    assert 0.5 <= kept <= 1.5, kept


def test_verify_plot_writes_svg_without_matplotlib_and_png_asks_for_it(factory, tmp_path, monkeypatch):
    from exporter import plot

    out, _ = factory.bundle("bert", "text-classification")
    monkeypatch.setattr(plot, "plot_available", lambda: False)  # a device without matplotlib
    r = CliRunner().invoke(cli, ["verify", str(out), "--plot", str(tmp_path / "device.svg")])
    assert r.exit_code == 0, r.output
    ElementTree.fromstring((tmp_path / "device.svg").read_text(encoding="utf-8"))
    r = CliRunner().invoke(cli, ["verify", str(out), "--plot", str(tmp_path / "device.png")])
    assert r.exit_code == 1 and "needs matplotlib" in r.output and "or give a .svg file" in r.output, r.output
    assert not (tmp_path / "device.png").exists()


def test_rewriting_a_report_drops_the_old_png_plot(factory, tmp_path):
    """A bundle from before the SVG plot whose report is written again (add-adapter) keeps no stale PNG."""
    from exporter.report import write_report

    out, _ = factory.bundle("bert", "text-classification")
    bundle = shutil.copytree(out, tmp_path / "old")
    (bundle / "report" / "errors.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    report = json.loads((bundle / "parity.json").read_text())
    write_report(bundle, report)
    assert not (bundle / "report" / "errors.png").exists() and (bundle / "report" / "errors.svg").exists()
    assert report["plot"] == "report/errors.svg"
