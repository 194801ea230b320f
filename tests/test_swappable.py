"""Swappable adapters (export --keep-adapters, add-adapter, verify, infer/generate --adapter).

Two adapters of different ranks (4 and 8, init_lora_weights=False, trained-size heads) share one tiny base
graph; every check compares against PyTorch models where the adapter is *merged*, computed independently of
the conversion to graph inputs.
"""

from __future__ import annotations

import gc
import json
import shutil

import jsonschema
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, make_adapter, make_base, run_export

from exporter.bundle import read_manifest
from exporter.cli import cli
from exporter.errors import MismatchError, UserInputError
from exporter.formats import sha256_file
from exporter.runtime import BundleGenerator, BundleModel, make_session
from exporter.schema import MANIFEST_SCHEMA, REPORT_SCHEMA
from exporter.swappable import (
    ActiveAdapters,
    Interface,
    check_bundle_adapter,
    check_tensors,
    write_adapter_file,
)
from exporter.verify import verify_bundle

TEXTS = ["The service was great and fast.", "Terrible food, never again.", "It arrived on Tuesday."]


def _copy(out, tmp_path, name="bundle"):
    dst = tmp_path / name
    shutil.copytree(out, dst)
    return dst


def test_layout_manifest_contract_and_graph(factory):
    out, report = factory.swap_bundle("encoder")
    assert report.passed
    m = read_manifest(out)
    jsonschema.validate(m, MANIFEST_SCHEMA)
    jsonschema.validate(json.loads((out / "parity.json").read_text()), REPORT_SCHEMA)
    section = m["adapters"]
    assert m["adapter"] is None and set(section["items"]) == {"first", "second"}
    # The base's classifier is untrained (random) without an adapter.
    assert section["base_gate"] == "fp32-only"
    assert section["untrained_base_tensors"] == ["classifier.bias", "classifier.weight"]
    assert section["graph_sha256"] == sha256_file(out / "onnx/model.onnx")
    for name, rank in (("first", 4), ("second", 8)):
        item = section["items"][name]
        assert (out / item["file"]).is_file() and (out / item["reference"]).is_file()
        assert item["rank"] == rank and set(item["ranks"].values()) == {rank}
        # lora_alpha = 2r in the helper, so alpha/r = 2 was folded into every lora_B.
        assert set(item["scaling"].values()) == {2.0}
        assert item["base_graph_sha256"] == section["graph_sha256"]
        assert item["labels"] == ["negative", "neutral", "positive"]
        assert {"classifier.weight", "classifier.bias"} <= set(item["full_parameters"])
        q = "bert.encoder.layer.0.attention.self.query"
        assert item["parameters"][f"{q}.lora_A"] == {"shape": [32, rank], "dtype": "float32"}
        assert item["parameters"][f"{q}.lora_B"] == {"shape": [rank, 32], "dtype": "float32"}
    graph = onnx.load(str(out / "onnx/model.onnx"))
    inputs = {i.name: i for i in graph.graph.input}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    interface = Interface.from_json(section["interface"])
    for name in interface.input_names:
        assert name in inputs and name in inits, name  # an input with a default: overridable
    a_dims = inputs[f"{q}.lora_A"].type.tensor_type.shape.dim
    assert a_dims[0].dim_value == 32 and a_dims[1].dim_param  # dynamic rank axis
    assert not inits[f"{q}.lora_A"].any() and not inits[f"{q}.lora_B"].any()  # zero default = base


def test_base_and_each_adapter_match_pytorch_and_switching(factory):
    out, report = factory.swap_bundle("encoder")
    for variant, r in report.data["variants"].items():
        assert r["passed"], (variant, r["failures"])
        assert set(r["adapters"]) == {"first", "second"}
        assert r["switching"]["passed"] and r["switching"]["configurations"] == 3
    fp32 = report.data["variants"]["fp32"]
    assert fp32["outputs"]["logits"]["max_abs_diff"] <= 1e-4
    for a in fp32["adapters"].values():
        assert a["outputs"]["logits"]["max_abs_diff"] <= 1e-4
    assert report.data["variants"]["int8"]["adapters"]["second"]["outputs"]["logits"]["cosine_min"] >= 0.99
    # The adapters really differ from the base and from each other, so the gates above could fail.
    for item in read_manifest(out)["adapters"]["items"].values():
        assert item["effect"]["meaningful"] and item["effect"]["max_abs_diff"]["logits"] > 1e-2


def test_adapter_equals_its_merged_export(factory, tmp_path):
    """The swappable graph with an adapter active == the merged export of that adapter (independent path)."""
    from exporter.pipeline import ExportSpec, run_pipeline

    out, _ = factory.swap_bundle("encoder")
    first, second = factory.swap_adapters("encoder")
    merged = tmp_path / "merged"
    run_pipeline(ExportSpec(adapter=second, out=merged, quantize=()))
    want = BundleModel(merged, "fp32")
    got = BundleModel(out, "fp32", adapter="second")
    feeds = want.encode(TEXTS)
    a, b = got.run(feeds)["logits"], want.run(feeds)["logits"]
    assert np.abs(a - b).max() <= 1e-4
    base = BundleModel(out, "fp32", adapter="first")
    assert np.abs(base.run(feeds)["logits"] - b).max() > 1e-2  # a different adapter gives different logits
    assert [r["label"] for r in got.infer(TEXTS)] == [r["label"] for r in want.infer(TEXTS)]


def test_switching_in_one_session_and_adapters_kept_alive(factory):
    out, _ = factory.swap_bundle("encoder")
    m = read_manifest(out)
    session = make_session(out / "onnx/model_quantized.onnx")
    feeds = BundleModel(out, "fp32", adapter="first").encode(TEXTS)
    holders = {n: ActiveAdapters(out, m, [n]) for n in ("first", "second")}

    def run(name):
        return session.run(["logits"], feeds, holders[name].run_options if name else None)[0]

    first = {n: run(n) for n in ("first", "second", None)}
    for n in ("second", None, "first", "second", "first", None):
        assert np.array_equal(run(n), first[n]), n
    assert np.abs(first["first"] - first["second"]).max() > 1e-2
    # onnxruntime silently runs the base when a LoraAdapter is freed under its RunOptions (measured on
    # 1.32; older versions crash): BundleModel must keep it alive.
    model = BundleModel(out, "int8", adapter="first")
    gc.collect()
    assert np.array_equal(model.run(feeds)["logits"], first["first"])


def test_quantized_base_keeps_adapters_fp32(factory):
    out, report = factory.swap_bundle("encoder")
    graph = onnx.load(str(out / "onnx/model_quantized.onnx"))
    interface = Interface.from_json(read_manifest(out)["adapters"]["interface"])
    lora = set(interface.input_names)
    users = [n for n in graph.graph.node if lora & set(n.input)]
    # Float ops only: no DynamicQuantizeLinear/MatMulInteger touches an adapter tensor.
    assert users and {n.op_type for n in users} <= {"MatMul", "Gemm", "Transpose", "Add"}, {n.op_type for n in users}
    assert any(n.op_type == "MatMulInteger" for n in graph.graph.node)  # the base itself is quantized
    assert report.data["sizes"]["int8"] < report.data["sizes"]["fp32"]


def test_contract_checks_name_the_problem():
    interface = Interface({"enc.q": (32, 16)}, {"head.weight": (3, 32)})
    ok = {"enc.q.lora_A": ((32, 4), "float32"), "enc.q.lora_B": ((4, 16), "float32"), "head.weight": ((3, 32), "float32")}
    assert check_tensors(ok, interface, "a") == {"enc.q": 4}
    cases = [
        ({"enc.q.lora_A": ((32, 4), "float32")}, "come in pairs"),
        ({**ok, "enc.k.lora_A": ((32, 4), "float32")}, "not an input of this graph"),
        ({**ok, "enc.q.lora_A": ((64, 4), "float32")}, "has shape 64x4, the graph expects 32xrank"),
        ({**ok, "enc.q.lora_B": ((8, 16), "float32")}, "lora_A of rank 4 but lora_B of rank 8"),
        ({**ok, "head.weight": ((2, 32), "float32")}, "has shape 2x32"),
        ({**ok, "enc.q.lora_A": ((32, 4), "float16")}, "float16"),
        ({}, "holds no tensors"),
    ]
    for tensors, needle in cases:
        with pytest.raises(MismatchError, match=needle):
            check_tensors(tensors, interface, "a")


def test_clash_and_foreign_file_are_refused(factory, tmp_path):
    out, _ = factory.swap_bundle("encoder")
    m = read_manifest(out)
    with pytest.raises(MismatchError, match="both set"):
        ActiveAdapters(out, m, ["first", "second"])
    with pytest.raises(UserInputError, match="no adapter 'third'"):
        ActiveAdapters(out, m, ["third"])
    from exporter.bundle import file_hashes, write_manifest
    from exporter.errors import BundleError
    from exporter.swappable import read_adapter_file

    def rehash(root):  # a tampered bundle whose manifest was made consistent again
        m2 = read_manifest(root)
        m2["files"] = file_hashes(root)
        write_manifest(root, m2)

    # An adapter file made for another graph (model version from another sha): the hash catches it first;
    # with the manifest re-hashed, the version written into the file still gives it away.
    dst = _copy(out, tmp_path)
    item = read_manifest(dst)["adapters"]["items"]["first"]
    _, tensors = read_adapter_file(dst / item["file"])
    arrays = {k: np.ones(s, np.float32) for k, (s, _) in tensors.items()}
    write_adapter_file(dst / item["file"], arrays, "f" * 64)
    with pytest.raises(BundleError, match="does not match the sha256 in the manifest"):
        check_bundle_adapter(dst, read_manifest(dst), "first")
    r = CliRunner().invoke(cli, ["infer", str(dst), "--adapter", "first", "x"])
    assert r.exit_code == 1 and "does not match the sha256" in r.stderr and "Traceback" not in r.output
    rehash(dst)
    with pytest.raises(MismatchError, match="written for another base graph"):
        check_bundle_adapter(dst, read_manifest(dst), "first")
    # A swapped-in file of the other adapter: the manifest's record of shapes no longer matches.
    dst2 = _copy(out, tmp_path, "b2")
    shutil.copyfile(dst2 / "adapters" / "second.onnx_adapter", dst2 / "adapters" / "first.onnx_adapter")
    with pytest.raises(BundleError, match="does not match the sha256"):
        check_bundle_adapter(dst2, read_manifest(dst2), "first")
    dst3 = _copy(dst2, tmp_path, "b3")
    rehash(dst3)
    with pytest.raises(MismatchError, match="does not hold what the manifest records"):
        check_bundle_adapter(dst3, read_manifest(dst3), "first")
    r = CliRunner().invoke(cli, ["verify", str(dst2), "--json"])
    assert r.exit_code == 3
    rep = json.loads(r.stdout)
    assert not rep["integrity"]["passed"]
    assert "adapters/first.onnx_adapter" in " ".join(rep["integrity"]["problems"])
    assert rep["variants"]["fp32"]["adapters"]["first"]["failures"][0].startswith("not run:")


def test_verify_cli_and_infer_adapter(factory, tmp_path):
    out, _ = factory.swap_bundle("encoder")
    r = CliRunner().invoke(cli, ["verify", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    jsonschema.validate(rep, REPORT_SCHEMA)
    assert rep["variants"]["int8"]["switching"]["passed"] and set(rep["adapters"]) == {"first", "second"}
    r = CliRunner().invoke(cli, ["infer", str(out), "--adapter", "second", "--json", *TEXTS])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["adapter"] == "second" and len(res["results"]) == 3
    assert res["results"] == [{**x, "text": t} for x, t in zip(BundleModel(out, adapter="second").infer(TEXTS), TEXTS)]
    r = CliRunner().invoke(cli, ["infer", str(out), "x"])
    assert r.exit_code == 1 and "choose an adapter with --adapter (first, second)" in r.stderr
    r = CliRunner().invoke(cli, ["infer", str(out), "--adapter", "nope", "x"])
    assert r.exit_code == 1 and "no adapter 'nope'" in r.stderr and "Traceback" not in r.output


def test_add_adapter(factory, tmp_path):
    out, _ = factory.swap_bundle("encoder")
    dst = _copy(out, tmp_path)
    base = factory.base("bert")
    third = make_adapter(base, "bert", "text-classification", tmp_path / "third", r=2, seed=3)
    r = CliRunner().invoke(cli, ["add-adapter", str(dst), "--adapter", f"third={third}", "--base", str(base),
                                 "--json", "-q"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["command"] == "add-adapter" and rep["passed"]
    jsonschema.validate(rep, REPORT_SCHEMA)
    for v in rep["variants"].values():
        assert set(v["adapters"]) == {"first", "second", "third"} and v["switching"]["configurations"] == 4
    m = read_manifest(dst)
    assert m["adapters"]["items"]["third"]["rank"] == 2
    assert sha256_file(dst / "onnx/model.onnx") == sha256_file(out / "onnx/model.onnx")  # the base was not re-exported
    assert verify_bundle(dst)["passed"]
    assert len(BundleModel(dst, adapter="third").infer(TEXTS)) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]


def test_add_adapter_refusals_leave_the_bundle_untouched(factory, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    out, _ = factory.swap_bundle("encoder")
    dst = _copy(out, tmp_path)
    before = {p.name: sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    base = factory.base("bert")
    other_base = make_base("bert", tmp_path / "other-base", seed=9)
    foreign = make_adapter(other_base, "bert", "text-classification", tmp_path / "foreign")
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3),
                        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["query", "value", "dense"]))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(tmp_path / "wider")
    (tmp_path / "wider" / "export_adapter.json").write_text(json.dumps({"labels": ["a", "b", "c"]}))
    cases = [
        (["--adapter", str(foreign), "--base", str(base)], "was trained for local:other-base"),
        (["--adapter", str(tmp_path / "wider"), "--base", str(base)], "is not an input of this graph"),
        (["--adapter", f"first={tmp_path / 'wider'}", "--base", str(base)], "already has an adapter named first"),
        (["--adapter", str(tmp_path / "wider")], "pass it with --base"),
        (["--adapter", str(tmp_path / "wider"), "--base", str(other_base)], "does not reproduce this bundle's base"),
        (["--adapter", str(make_adapter(base, "bert", "text-classification", tmp_path / "two", labels=["n", "y"])),
          "--base", str(base)], "has 2 labels, this bundle's graph serves a head of 3"),
    ]
    for args, needle in cases:
        r = CliRunner().invoke(cli, ["add-adapter", str(dst), *args, "-q"])
        assert r.exit_code == 1, (args, r.output)
        msg = r.stderr.strip()
        assert msg.startswith("error: ") and len(msg.splitlines()) == 1 and needle in msg, (needle, msg)
        assert "Traceback" not in r.output
    after = {p.name: sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
    merged, _ = factory.bundle("bert", "text-classification")
    r = CliRunner().invoke(cli, ["add-adapter", str(merged), "--adapter", str(foreign), "-q"])
    assert r.exit_code == 1 and "no swappable adapters" in r.stderr


def test_export_refusals(factory, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = factory.base("bert")
    first, _ = factory.swap_adapters("encoder")
    two_labels = make_adapter(base, "bert", "text-classification", tmp_path / "two", labels=["no", "yes"])
    pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3),
                        LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                   target_modules=["query", "value"]))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(tmp_path / "dora")
    cases = [
        ([str(first), str(two_labels)], "heads of different sizes"),
        ([str(tmp_path / "dora")], "DoRA cannot stay swappable"),
        ([f"x={first}", f"x={first}"], "two adapters are named x"),
    ]
    for adapters, needle in cases:
        out = tmp_path / "out"
        args = [a for p in adapters for a in ("--adapter", p)]
        r = CliRunner().invoke(cli, ["export", "--keep-adapters", *args, "-o", str(out), "-q"])
        assert_clean_failure(r, out, needle)
    r = run_export(first, tmp_path / "o2", "--adapter", str(two_labels))
    assert r.exit_code == 2 and "need --keep-adapters" in r.output
    # -o inside the second adapter's folder would destroy it.
    inside = two_labels / "bundle"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", str(first), "--adapter", str(two_labels),
                                 "-o", str(inside), "-q"])
    assert r.exit_code == 1 and "is inside an input folder of this export" in r.stderr and "two" in r.stderr
    assert (two_labels / "adapter_model.safetensors").is_file() and not inside.exists()


def test_decoder_adapters_generate_like_their_merged_exports(factory, tmp_path):
    from exporter.pipeline import ExportSpec, run_pipeline

    out, report = factory.swap_bundle("decoder")
    assert report.passed, [r["failures"] for r in report.data["variants"].values()]
    for variant in ("fp32", "int8", "int4"):
        r = report.data["variants"][variant]
        assert set(r["adapters"]) == {"first", "second"} and r["switching"]["passed"]
    fp32 = report.data["variants"]["fp32"]
    assert fp32["outputs"]["logits"]["greedy_exact"] == 1.0
    assert all(a["outputs"]["logits"]["greedy_exact"] == 1.0 for a in fp32["adapters"].values())
    _, second = factory.swap_adapters("decoder")
    merged = tmp_path / "merged"
    run_pipeline(ExportSpec(adapter=second, out=merged, quantize=()))
    prompt = "Once upon a time"
    want = BundleGenerator(merged, "fp32").generate(prompt, max_new_tokens=8)
    assert BundleGenerator(out, "fp32", adapter="second").generate(prompt, max_new_tokens=8) == want
    assert BundleGenerator(out, "fp32").generate(prompt, max_new_tokens=8) != want  # the base differs
    r = CliRunner().invoke(cli, ["generate", str(out), prompt, "--adapter", "second", "--variant", "fp32",
                                 "--max-new-tokens", "8"])
    assert r.exit_code == 0 and r.stdout.strip() == want.strip(), r.output
    assert verify_bundle(out)["passed"]


def test_quantized_base_with_random_head_is_reported_not_gated(factory, tmp_path):
    """A changed base reference fails fp32 (graph == base is gated); int8 reports the miss, gates the adapters."""
    from exporter.bundle import file_hashes, write_manifest
    from exporter.probes import load_arrays, save_arrays

    out, _ = factory.swap_bundle("encoder")
    dst = _copy(out, tmp_path)
    m = read_manifest(dst)
    n = len(json.loads((dst / "reference" / "probes.json").read_text())["batches"])
    ref = load_arrays(dst / "reference" / "outputs.npz", n)
    save_arrays(dst / "reference" / "outputs.npz", [{"logits": -r["logits"]} for r in ref])
    m["files"] = file_hashes(dst)
    write_manifest(dst, m)
    rep = verify_bundle(dst)
    fp32, int8 = rep["variants"]["fp32"], rep["variants"]["int8"]
    assert not fp32["passed"] and fp32["failures"][0].startswith("logits:")
    assert int8["passed"] and "classifier.bias, classifier.weight are untrained" in int8["base_not_gated"]
    assert all(a["passed"] for a in int8["adapters"].values())
    out_dec, _ = factory.swap_bundle("decoder")
    assert read_manifest(out_dec)["adapters"]["base_gate"] == "all"


def test_rslora_scaling_is_folded_and_checked(factory, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    base = factory.base("bert")
    pm = get_peft_model(AutoModel.from_pretrained(base),
                        LoraConfig(task_type="FEATURE_EXTRACTION", r=4, lora_alpha=8, use_rslora=True,
                                   init_lora_weights=False, target_modules=["query", "value"]))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(tmp_path / "rs")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", f"rs={tmp_path / 'rs'}", "-o", str(out),
                                 "--quantize", "int8", "-q", "--json"])
    assert r.exit_code == 0, r.output
    item = read_manifest(out)["adapters"]["items"]["rs"]
    assert all(s == pytest.approx(8 / 2) for s in item["scaling"].values())  # alpha / sqrt(r), not alpha / r
    rep = json.loads(r.stdout)
    fp32 = rep["variants"]["fp32"]["adapters"]["rs"]["outputs"]
    assert fp32["sentence_embedding"]["max_abs_diff"] <= 1e-4 and fp32["last_hidden_state"]["max_abs_diff"] <= 1e-4
    assert read_manifest(out)["adapters"]["base_gate"] == "all"  # feature extraction: no untrained head
    assert len(BundleModel(out, adapter="rs").infer(["hello"])[0]["embedding"]) == 32


def test_lora_on_a_module_another_adapter_replaces_whole(factory, tmp_path):
    """Adapter a has LoRA on bert.pooler.dense, adapter b saves the whole pooler: both are inputs of one graph."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = factory.base("bert")
    paths = []
    for name, targets, save, seed in (("a", ["query", "dense"], ["classifier"], 1),
                                      ("b", ["query", "value"], ["classifier", "pooler"], 2)):
        import torch

        torch.manual_seed(seed)
        pm = get_peft_model(AutoModelForSequenceClassification.from_pretrained(base, num_labels=3),
                            LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                                       target_modules=targets, modules_to_save=save))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if ".modules_to_save." in n:
                    p.add_(torch.randn_like(p) * 0.5)
        pm.peft_config["default"].base_model_name_or_path = str(base)
        pm.save_pretrained(tmp_path / name)
        (tmp_path / name / "export_adapter.json").write_text(json.dumps({"labels": ["x", "y", "z"]}))
        paths.append(f"{name}={tmp_path / name}")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", paths[0], "--adapter", paths[1], "-o",
                                 str(out), "-q", "--json"])
    assert r.exit_code == 0, r.output
    interface = read_manifest(out)["adapters"]["interface"]
    assert "bert.pooler.dense" in interface["lora_modules"]
    assert "bert.pooler.dense.weight" in interface["full_parameters"]
    fp32 = json.loads(r.stdout)["variants"]["fp32"]
    assert all(a["outputs"]["logits"]["max_abs_diff"] <= 1e-4 for a in fp32["adapters"].values())


def test_gpt2_conv1d_lora_stays_swappable_whole_conv1d_is_refused(factory, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = factory.decoder_base("gpt2")
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", str(factory.decoder_adapter("gpt2")),
                                 "-o", str(out), "--quantize", "int4", "-q", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["variants"]["fp32"]["adapters"]["dadapter-gpt2"]["outputs"]["logits"]["greedy_exact"] == 1.0
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["c_attn"], modules_to_save=["attn.c_proj"]))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(tmp_path / "whole")
    r = CliRunner().invoke(cli, ["export", "--keep-adapters", "--adapter", str(tmp_path / "whole"), "-o",
                                 str(tmp_path / "o2"), "-q"])
    assert_clean_failure(r, tmp_path / "o2", "saves the whole Conv1D layer")


def test_add_adapter_parity_failure_leaves_the_bundle_untouched(factory, tmp_path, monkeypatch):
    import exporter.verify as verify_mod

    out, _ = factory.swap_bundle("encoder")
    dst = _copy(out, tmp_path)
    before = {p.relative_to(dst).as_posix(): sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    real = verify_mod.evaluate_variants

    def failing(*args, **kwargs):
        results = real(*args, **kwargs)
        results["int8"]["passed"] = False
        results["int8"]["failures"].append("adapter third: forced failure for the test")
        return results

    monkeypatch.setattr(verify_mod, "evaluate_variants", failing)
    base = factory.base("bert")
    third = make_adapter(base, "bert", "text-classification", tmp_path / "third", r=2, seed=3)
    r = CliRunner().invoke(cli, ["add-adapter", str(dst), "--adapter", str(third), "--base", str(base), "-q"])
    assert r.exit_code == 3 and "forced failure" in r.stderr and "is unchanged" in r.stderr
    after = {p.relative_to(dst).as_posix(): sha256_file(p) for p in dst.rglob("*") if p.is_file()}
    assert after == before
    rejected = tmp_path / "bundle.rejected"
    assert (rejected / "adapters" / "third.onnx_adapter").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
