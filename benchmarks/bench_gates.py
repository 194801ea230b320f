"""Calibration of the parity gates: verdicts over a good set and a known-bad set, false rejects / false accepts.

    python benchmarks/bench_gates.py [--no-decoder] [--json FILE] [--keep DIR]

Good set (every variant should pass; each is also scored by its task metric where there is labelled data):
- the main job's committed adapter (samples/adapters/minilm-sentiment) and the q/v r=4 one, on the real
  all-MiniLM-L6-v2, int8 + fp16, accuracy on samples/data/sentiment/eval.jsonl;
- a 3-label classifier: LoRA r=8 on query/key/value/dense (init_lora_weights=False) and a head fitted by
  least squares on real sentences (negative / positive from the sentiment data, "other" from the NER data);
- a 2-label untrained (random) head + LoRA r=8 q/v: near-zero logits, the ill-conditioned case;
- feature-extraction (sentence embeddings) + LoRA r=8 q/v;
- token classification (PER/ORG/LOC): the adapter recipes/minilm-ner.yaml fine-tunes (LoRA r=16, ~1 min),
  entity F1 on samples/data/ner/eval.jsonl;
- SmolLM2-135M-Instruct + LoRA r=8 q/v (benchmarks/bench_smollm2.py's adapter) and + LoRA r=16 on every
  attention and MLP projection, int8 + int4.
Known-bad set (every one must be refused):
- adapter dropped: each variant exported from the same adapter with its LoRA B zeroed (the head kept);
- one weight perturbed: 5% noise on one projection of the fp32 graph (fp32 promises the merged model itself);
- a broken int8: every weight zero point of the int8 graph one step off (a classic quantizer bug); for
  the decoder, onnxruntime's plain quantize_dynamic (per-tensor U8S8: this project's int8 before issue 10);
- a wrong tokenizer: tokenizer.json without lower-casing, the manifest re-hashed (verify's tokenizer check).
Each bad variant replaces its file in a copy of the good bundle and is judged by `verify`'s own code against
the good bundle's PyTorch reference and thresholds.

Prints one row per (case, variant) with the gates that failed, then per gate: how many good variants it
refused (false rejects) and how many bad ones it caught; and the totals. Target: 0 false rejects, 0 false
accepts (--check exits 1 otherwise; CI runs it). A bad variant whose task metric shows no real drop (paired,
as `run` judges) is a defect the user cannot feel: accepting it is listed, never counted as a false accept.
Takes ~11 min on 2 cores (a third of it the decoder; --no-decoder skips it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
MINILM = "embedded:all-MiniLM-L6-v2"
DATA = ROOT / "samples" / "data"

# Gate names as the failure messages of exporter.parity / exporter.verify word them.
GATES = {
    "values exceed": "fp32 tolerance",
    "min cosine": "min_cosine",
    "argmax agreement": "argmax_agreement",
    "class probability": "max_prob_diff",
    "mean KL": "max_mean_kl",
    "nearest-neighbour": "min_neighbour_agreement",
    "rank correlation": "min_rank_correlation",
    "match PyTorch exactly": "greedy_exact",
    "matching prefix": "min_prefix_match",
    "re-tokenizing": "tokenizer check",
    "NaN or inf": "finite",
    "task metric": "task metric",
    "of the adapter's effect": "min_adapter_kept",
}


def gate_of(failure: str) -> str:
    return next((g for k, g in GATES.items() if k in failure), "other")


@dataclass
class Row:
    case: str
    variant: str
    good: bool
    passed: bool
    failures: list[str]
    metrics: dict
    task: dict | None = None
    gates: list[str] = field(default_factory=list)
    harmless: bool = False  # a bad variant whose task metric shows no real drop
    dtype: str = ""  # the variant's manifest dtype (good rows): which int8 format --int8-weights auto kept


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- building cases


def minilm_location() -> str:
    from exporter.loading import resolve_base_name

    return str(resolve_base_name(MINILM).location)


def _head_inputs(model, head, batches) -> list:
    """What the head receives for each encoded batch, adapter active."""
    import torch

    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for enc in batches:
            model(**enc)
    handle.remove()
    return seen


def _fit(x: np.ndarray, y: np.ndarray, n_labels: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares of scaled one-hot targets: a real head, without a training loop."""
    t = np.full((len(y), n_labels), -scale / n_labels)
    t[np.arange(len(y)), y] += scale
    xb = np.hstack([x, np.ones((len(x), 1))])
    w = np.linalg.solve(xb.T @ xb + 1e-2 * np.eye(xb.shape[1]), xb.T @ t)
    return w[:-1].T.astype(np.float32), w[-1].astype(np.float32)


def make_encoder_adapter(out: Path, task: str, targets: list[str], labels: list[str] | None, head: str,
                         seed: int = 0, b_scale: float = 0.2) -> Path:
    """A LoRA adapter on the real MiniLM; head "random" (untrained) or "fit" (least squares on real data)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModel,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    loc = minilm_location()
    tok = AutoTokenizer.from_pretrained(loc)
    torch.manual_seed(seed)
    cls = {"text-classification": AutoModelForSequenceClassification, "feature-extraction": AutoModel}[task]
    kwargs = {"num_labels": len(labels)} if labels else {}
    model = cls.from_pretrained(loc, **kwargs)
    task_type = {"text-classification": "SEQ_CLS", "feature-extraction": "FEATURE_EXTRACTION"}[task]
    pm = get_peft_model(model, LoraConfig(task_type=task_type, r=8, lora_alpha=16, init_lora_weights=False,
                                          target_modules=targets))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    pm.eval()
    if head == "fit":  # text-classification: sentiment negative / positive, NER sentences as "other"
        classifier = pm.base_model.model.classifier
        sent = jsonl(DATA / "sentiment" / "train.jsonl")[:400]
        other = [" ".join(r["tokens"]) for r in jsonl(DATA / "ner" / "train.jsonl")[:200]]
        texts = [r["text"] for r in sent] + other
        y = np.array([labels.index(r["label"]) for r in sent] + [labels.index("other")] * len(other))
        encs = [tok(texts[i:i + 32], padding=True, truncation=True, max_length=128, return_tensors="pt")
                for i in range(0, len(texts), 32)]
        x = torch.cat(_head_inputs(pm, classifier, encs)).numpy()
        w, b = _fit(x, y, len(labels))
        target = classifier.modules_to_save["default"] if hasattr(classifier, "modules_to_save") else classifier
        with torch.no_grad():
            target.weight.copy_(torch.from_numpy(w))
            target.bias.copy_(torch.from_numpy(b))
    pm.peft_config["default"].base_model_name_or_path = MINILM
    pm.save_pretrained(out)
    return out


def drop_adapter(adapter: Path, out: Path) -> Path:
    """The same adapter with every LoRA B zeroed: the head (modules_to_save) stays, the LoRA deltas are gone."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(adapter, out)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: (np.zeros_like(v) if "lora_B" in k else v) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def export(adapter: Path, out: Path, task: str, modes: tuple[str, ...], labels=None, eval_spec=None,
           base: str = MINILM, reuse: bool = False) -> tuple[Path, dict]:
    """A bundle (published, or OUT.rejected when a gate refused it) and its report; --reuse takes one built
    by an earlier run."""
    from exporter.errors import ParityError
    from exporter.pipeline import ExportSpec, run_pipeline

    for root in (out, out.with_name(out.name + ".rejected")):
        if reuse and (root / "parity.json").exists():
            return root, json.loads((root / "parity.json").read_text(encoding="utf-8"))
    spec = ExportSpec(adapter=adapter, out=out, base=base, task=task, quantize=modes,
                      labels=tuple(labels) if labels else None, task_eval=eval_spec, overwrite=True)
    try:
        return out, run_pipeline(spec).data
    except ParityError as e:
        return out.with_name(out.name + ".rejected"), e.report


def current_gates(root: Path) -> None:
    """Judge with this checkout's tolerances (not the ones recorded at export), re-hashing what changed, so the
    only check left to tell a tampered file from a good one is the gates themselves."""
    from exporter.bundle import file_hashes, read_manifest, write_manifest
    from exporter.tolerances import gate_for

    manifest = read_manifest(root)
    for v, entry in manifest["variants"].items():
        entry["thresholds"] = gate_for(manifest["task"], v)
    manifest["files"] = file_hashes(root)
    write_manifest(root, manifest)


def sentiment_eval(labels=None):
    from exporter.taskeval import TaskEvalSpec

    rows = jsonl(DATA / "sentiment" / "eval.jsonl")
    if labels and "other" in labels:
        rows = rows + [{"text": " ".join(r["tokens"]), "label": "other"} for r in jsonl(DATA / "ner" / "eval.jsonl")]
    return TaskEvalSpec(tuple(rows), "text", "label", 0.01)


def ner_eval():
    from exporter.taskeval import TaskEvalSpec

    return TaskEvalSpec(tuple(jsonl(DATA / "ner" / "eval.jsonl")), "tokens", "tags", 0.01)


# ---------------------------------------------------------------------------------------------- bad variants


def _replace_variant(good: Path, bad_root: Path, variant: str, source: Path) -> None:
    """Copy the bad variant's file(s) over the good bundle's variant in bad_root."""
    from exporter.bundle import read_manifest

    entry = read_manifest(good)["variants"][variant]
    shutil.copyfile(source / entry["file"], bad_root / entry["file"])


def perturb_weight(path: Path, scale: float = 0.05) -> None:
    """5% Gaussian noise (of the matrix's mean |w|) on the first 2-D weight a MatMul consumes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inputs = {x for n in model.graph.node if n.op_type in ("MatMul", "Gemm") for x in n.input}
    init = next(i for i in model.graph.initializer if len(i.dims) == 2 and i.name in inputs)
    w = numpy_helper.to_array(init)
    noise = np.random.default_rng(0).standard_normal(w.shape) * scale * float(np.abs(w.astype(np.float32)).mean())
    init.CopyFrom(numpy_helper.from_array((w.astype(np.float32) + noise).astype(w.dtype), init.name))
    onnx.save(model, str(path))


def zero_points_off_by_one(path: Path) -> None:
    """Every int8 weight's zero point one step off (a classic quantizer bug: each weight shifted by one step)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    zps = {n.input[3] for n in model.graph.node if n.op_type == "MatMulInteger" and len(n.input) > 3}
    for name in zps & set(inits):
        a = numpy_helper.to_array(inits[name])
        info = np.iinfo(a.dtype)  # uint8 (unsigned weights) or int8 (7-bit signed weights, zero point 0)
        inits[name].CopyFrom(numpy_helper.from_array(np.clip(a.astype(np.int32) + 1, info.min, info.max)
                                                     .astype(a.dtype), name))
    if not zps:
        raise RuntimeError(f"{path}: no MatMulInteger weight zero points")
    onnx.save(model, str(path))


def plain_quantize_dynamic(src: Path, dst: Path) -> None:
    """onnxruntime's default dynamic int8 (per-tensor, U8S8), as a plain script would quantize a decoder."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The fused decoder graph's contrib ops stop onnx's shape inference; a script would name the type as
    # onnxruntime's error tells it to.
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def wrong_tokenizer(root: Path) -> None:
    """tokenizer.json that no longer lower-cases (the manifest is re-hashed after every mutation)."""
    tj = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
    norm = tj["normalizer"]
    assert norm.get("lowercase") is True, norm
    norm["lowercase"] = False
    (root / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")


# ---------------------------------------------------------------------------------------------- judging


def judge_bundle(root: Path, variants: list[str] | None = None) -> dict:
    from exporter.verify import verify_bundle

    current_gates(root)
    return verify_bundle(root, variants)


def task_metric_vs_fp32(good: Path, bad: Path, variant: str, eval_spec) -> dict:
    """The bad variant's task metric next to the good bundle's fp32 (== PyTorch to 1e-4), paired as `run` does."""
    from exporter.bundle import read_manifest
    from exporter.runtime import bundle_tokenizer, make_session, text_input_names
    from exporter.taskeval import judge, prepare, run_engine

    manifest = read_manifest(good)
    ev = prepare(manifest["task"], eval_spec, manifest["labels"], bundle_tokenizer(good, manifest),
                 text_input_names(manifest))
    scored = {}
    for name, root, v in (("fp32", good, "fp32"), (variant, bad, variant)):
        session = make_session(root / manifest["variants"][v]["file"])
        scored[name] = run_engine(ev, lambda f, s=session: s.run(["logits"], f)[0])
    judged = judge(manifest["task"], scored["fp32"], {variant: scored[variant]}, eval_spec.max_metric_drop,
                   len(eval_spec.rows))
    return {"metric": judged["metric"], "torch": judged["torch"], **judged["variants"][variant]}


def rows_from_report(case: str, report: dict, good: bool, variants: list[str] | None = None) -> list[Row]:
    out = []
    judged = report.get("task_metrics") or {}
    tm = {v: {"metric": judged["metric"], **t} for v, t in judged.get("variants", {}).items()}
    problems = report.get("integrity", {}).get("problems", [])
    for v, r in report["variants"].items():
        if variants and v not in variants:
            continue
        fails = list(r["failures"]) + list(problems)
        out.append(Row(case, v, good, r["passed"] and not problems, fails, r.get("outputs", {}), tm.get(v),
                       sorted({gate_of(f) for f in fails})))
    return out


def summary_metrics(outputs: dict) -> str:
    parts = []
    for name, m in outputs.items():
        keys = [("prob_max_abs_diff", "|dp|", ".3f"), ("mean_kl", "KL", ".2g"), ("cosine_min_gated", "cos*", ".4f"),
                ("cosine_min", "cos", ".4f"), ("argmax_agreement_clear", "top1*", ".2f"),
                ("neighbour_agreement_clear", "nn*", ".2f"), ("rank_correlation", "rho", ".4f"),
                ("prefix_match_mean", "prefix", ".2f"), ("adapter_kept", "kept", ".2f"),
                ("max_abs_diff", "max|d|", ".2g")]
        vals = [f"{label} {m[k]:{fmt}}" for k, label, fmt in keys if k in m]
        short = {"last_hidden_state": "hidden", "sentence_embedding": "emb"}.get(name, "")
        parts.append((f"{short}: " if short else "") + ", ".join(vals))
    return "; ".join(parts)


def task_cell(t: dict | None) -> str:
    if not t:
        return ""
    s = f"{t.get('metric', '')} {t.get('value', float('nan')):.4f}"
    if "worse" in t:
        s += f" (-{t['worse']}/+{t['better']}"
        if t.get("p_value") is not None:
            s += f", p={t['p_value']:.3g}"
        s += ")"
    return s


def print_table(rows: list[Row], torch_metrics: dict[str, str]) -> int:
    """The table and the totals; returns the number of wrong verdicts (false rejects + false accepts)."""
    print(f"\n{'case':38} {'variant':7} {'set':4} {'verdict':8} {'gates failed':34} metrics / task metric")
    for r in rows:
        verdict = "pass" if r.passed else "REFUSE"
        wrong = (r.good and not r.passed) or (not r.good and r.passed and not r.harmless)
        flag = "  <-- false " + ("reject" if r.good else "accept") if wrong else ""
        if not r.good and r.passed and r.harmless:
            flag = "  (a defect its task metric does not feel: accepting it is right)"
        task = task_cell(r.task)
        if task and r.case in torch_metrics:
            task = f"torch {torch_metrics[r.case]} -> {task}"
        elif task and "torch" in r.task:
            task = f"good fp32 {r.task['torch']:.4f} -> {task}"
        fmt = f" [{r.dtype.removeprefix('int8-dynamic-per-channel-')}]" if r.dtype.startswith("int8-dynamic") else ""
        print(f"{r.case:38} {r.variant:7} {'good' if r.good else 'bad':4} {verdict:8} {', '.join(r.gates) or '-':34} "
              f"{summary_metrics(r.metrics)}{fmt}{' | ' + task if task else ''}{flag}")
    gates = sorted({g for r in rows for g in r.gates} | set(GATES.values()) - {"finite"})
    print(f"\n{'gate':26} {'good refused (false rejects)':>30} {'bad caught':>11}")
    for g in gates:
        fr = sum(1 for r in rows if r.good and g in r.gates)
        caught = sum(1 for r in rows if not r.good and g in r.gates)
        print(f"{g:26} {fr:>30} {caught:>11}")
    good = [r for r in rows if r.good]
    bad = [r for r in rows if not r.good]
    formats = [r.dtype.removeprefix("int8-dynamic-per-channel-") for r in good if r.dtype.startswith("int8-dynamic")]
    if formats:  # --int8-weights auto: u8s7 where it passed its gate, u8u8 where it did not
        print("\nencoder int8 formats kept: " + ", ".join(f"{f} {formats.count(f)}" for f in sorted(set(formats))))
    print(f"\ngood variants: {len(good)}, false rejects: {sum(not r.passed for r in good)}")
    harmless = sum(r.passed and r.harmless for r in bad)
    false_accepts = sum(r.passed and not r.harmless for r in bad)
    print(f"bad variants: {len(bad)}, false accepts: {false_accepts}"
          + (f" (+{harmless} accepted defect(s) whose task metric shows no real drop)" if harmless else ""))
    return sum(not r.passed for r in good) + false_accepts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-decoder", action="store_true", help="skip the SmolLM2 cases (about half the time)")
    ap.add_argument("--json", type=Path, help="also write every row as JSON")
    ap.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary one)")
    ap.add_argument("--check", action="store_true", help="exit 1 on any false reject or false accept (CI)")
    ap.add_argument("--reuse", action="store_true",
                    help="with --keep: re-judge the bundles an earlier run built there (for tuning thresholds)")
    args = ap.parse_args()
    from exporter.cpu import cpu_features
    from exporter.stages import quiet_libraries

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-gates-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {cpu_features()}", flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    torch_metrics: dict[str, str] = {}

    def good_case(name, adapter, task, modes, labels=None, eval_spec=None, base=MINILM):
        print(f"[{time.perf_counter() - t0:6.0f}s] good: {name}", file=sys.stderr, flush=True)
        root, report = export(adapter, work / slug(name), task, modes, labels, eval_spec, base, args.reuse)
        verdict = judge_bundle(root)  # the bench owns the bundle: its manifest takes this checkout's gates
        tm = report.get("task_metrics")
        new = rows_from_report(name, {**verdict, "task_metrics": tm}, True)
        variants = json.loads((root / "manifest.json").read_text(encoding="utf-8"))["variants"]
        for row in new:
            row.dtype = variants[row.variant]["dtype"]
        rows.extend(new)
        if tm:
            torch_metrics[name] = f"{tm['torch']:.4f}"
        return root, report

    def bad_case(name, good_root, variants, mutate, eval_spec=None):
        print(f"[{time.perf_counter() - t0:6.0f}s] bad: {name}", file=sys.stderr, flush=True)
        bad = work / slug(name)
        if bad.exists():
            shutil.rmtree(bad)
        shutil.copytree(good_root, bad)
        mutate(bad)
        new = rows_from_report(name, judge_bundle(bad, variants), False, variants)
        for row in new:
            if eval_spec is not None and row.variant != "fp32":
                row.task = task_metric_vs_fp32(good_root, bad, row.variant, eval_spec)
                # A defect the task does not feel (the drop is within max_metric_drop or not significant):
                # accepting it is right; reported as its own kind, never counted as a false accept.
                row.harmless = row.task["passed"]
        rows.extend(new)

    def dropped(name, adapter, good_root, task, modes, labels=None, base=MINILM, eval_spec=None):
        zero = work / f"{slug(name)}-adapter"
        if not zero.exists():
            drop_adapter(adapter, zero)
        src, _ = export(zero, work / f"{slug(name)}-src", task, modes, labels, None, base, args.reuse)
        variants = ["fp32", *modes]
        bad_case(name, good_root, variants,
                 lambda b: [_replace_variant(good_root, b, v, src) for v in variants], eval_spec)

    with quiet_libraries():
        enc = ("int8", "fp16")
        sample = ROOT / "samples" / "adapters" / "minilm-sentiment"
        s_root, _ = good_case("sentiment (main job's adapter)", sample, "text-classification", enc,
                              eval_spec=sentiment_eval())
        good_case("sentiment q/v r=4", ROOT / "samples" / "adapters" / "minilm-sentiment-qv-r4",
                  "text-classification", enc, eval_spec=sentiment_eval())
        labels3 = ["negative", "positive", "other"]
        a3 = make_encoder_adapter(work / "a-3label", "text-classification", ["query", "key", "value", "dense"],
                                  labels3, "fit")
        c3_root, _ = good_case("3 labels, fitted head, qkv+dense", a3, "text-classification", enc, labels3,
                               sentiment_eval(labels3))
        a2 = make_encoder_adapter(work / "a-random-head", "text-classification", ["query", "value"],
                                  ["a", "b"], "random", seed=1)
        good_case("2 labels, untrained head", a2, "text-classification", enc, ["a", "b"])
        afe = make_encoder_adapter(work / "a-embed", "feature-extraction", ["query", "value"], None, "random", seed=2)
        fe_root, _ = good_case("sentence embeddings", afe, "feature-extraction", enc)
        ner_labels = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
        atc = work / "a-ner"
        if not (atc / "adapter_config.json").exists():
            from exporter.finetune import finetune
            from exporter.recipes import load_recipe

            print(f"[{time.perf_counter() - t0:6.0f}s] fine-tuning recipes/minilm-ner.yaml", file=sys.stderr, flush=True)
            finetune(load_recipe(ROOT / "recipes" / "minilm-ner.yaml"), atc, overwrite=True, quiet=True)
        tc_root, _ = good_case("token classification (NER recipe)", atc, "token-classification", enc, ner_labels,
                               ner_eval())

        dropped("sentiment: adapter dropped", sample, s_root, "text-classification", enc, eval_spec=sentiment_eval())
        dropped("3 labels: adapter dropped", a3, c3_root, "text-classification", enc, labels3,
                eval_spec=sentiment_eval(labels3))
        dropped("embeddings: adapter dropped", afe, fe_root, "feature-extraction", enc)
        dropped("token cls: adapter dropped", atc, tc_root, "token-classification", enc, ner_labels,
                eval_spec=ner_eval())
        for name, root, ev in (("sentiment", s_root, sentiment_eval()), ("embeddings", fe_root, None),
                               ("token cls", tc_root, ner_eval())):
            bad_case(f"{name}: one weight +5% noise", root, ["fp32"], lambda b: perturb_weight(b / "onnx/model.onnx"))
            bad_case(f"{name}: int8 zero points off by one", root, ["int8"],
                     lambda b: zero_points_off_by_one(b / "onnx/model_quantized.onnx"), ev)
            bad_case(f"{name}: wrong tokenizer", root, ["fp32"], wrong_tokenizer)

        if not args.no_decoder:
            from bench_smollm2 import SMOL, make_inputs

            base, adapter = make_inputs(work / "smol", degrid=False)
            d_root, _ = good_case("SmolLM2 + LoRA q/v", adapter, "text-generation", ("int8", "int4"), base=base)
            dropped("SmolLM2: adapter dropped", adapter, d_root, "text-generation", ("int8", "int4"), base=SMOL)
            bad_case("SmolLM2: plain quantize_dynamic int8", d_root, ["int8"],
                     lambda b: plain_quantize_dynamic(d_root / "onnx/model.onnx", b / "onnx/model_quantized.onnx"))
            bad_case("SmolLM2: one weight +5% noise", d_root, ["fp32"], lambda b: perturb_weight(b / "onnx/model.onnx"))
            # A second adapter: every attention and MLP projection, r=16, a larger effect.
            _, wide = make_inputs(work / "smol-wide", degrid=False, r=16, b_scale=0.03, seed=1,
                                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
            w_root, _ = good_case("SmolLM2 + LoRA r=16, all projections", wide, "text-generation", ("int8", "int4"),
                                  base=base)
            dropped("SmolLM2 r=16: adapter dropped", wide, w_root, "text-generation", ("int8", "int4"), base=SMOL)

    print(f"\nbuilt and judged in {time.perf_counter() - t0:.0f} s")
    wrong = print_table(rows, torch_metrics)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str), encoding="utf-8")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if args.check and wrong:
        sys.exit(f"{wrong} wrong verdict(s)")


if __name__ == "__main__":
    main()
