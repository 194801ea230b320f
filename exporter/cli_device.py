"""The device profile's commands (keygen, verify, infer, generate, inspect: no torch) and the JSON output every
command shares. ``cli.py`` adds these commands to its group, whose error handling they share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from .errors import EXIT_PARITY, UserInputError


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, allow_nan=False))


THREADS = click.option("--threads", type=click.IntRange(min=1), default=None, help="onnxruntime intra-op threads.")
ADAPTER = click.option("--adapter", default=None, help="Swappable adapter to activate (bundles exported with "
                       "--keep-adapters). Default: none (the base).")
ORT_FORMAT = click.option("--ort-format", is_flag=True, help="Run the variant's ORT-format file (bundles exported "
                          "with --ort-format) instead of its .onnx.")


@click.command()
@click.argument("private_key", metavar="KEY.pem", type=click.Path(path_type=Path))
def keygen(private_key: Path) -> None:
    """Make an Ed25519 key pair for signing bundles: KEY.pem (private, mode 0600; keep it on the build
    machine) and KEY.pub.pem (for devices: verify --trusted-key). Never overwrites a key. Needs cryptography."""
    from .signing import keygen as make_keys

    private, public = make_keys(private_key)
    click.echo(f"private key: {private}\npublic key:  {public}")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variant(s) to check (fp32, int8, fp16). Default: all.")
@click.option("--providers", multiple=True, help="onnxruntime execution provider(s). Default: CPUExecutionProvider.")
@THREADS
@click.option("--probe-texts", type=click.Path(path_type=Path), default=None,
              help="Also judge every quantized variant on your own texts (prompts for decoders), one per line or "
                   "JSON Lines; without PyTorch on the device the fp32 graph is their reference.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Write this device's error-distribution plot: SVG, or PNG for a FILE.png (needs matplotlib).")
@click.option("--trusted-key", type=click.Path(path_type=Path), default=None, metavar="PUB.pem",
              help="Require a valid signature by this Ed25519 public key (export --sign) before anything in the "
                   "bundle is read; unsigned or mis-signed: exit 3. Needs the sign extra (cryptography).")
@click.option("--json", "as_json", is_flag=True, help="Print the Report (passed, variants, integrity) on stdout.")
def verify(bundle: Path, variants: tuple[str, ...], providers: tuple[str, ...], threads: int | None,
           probe_texts: Path | None, plot: Path | None, trusted_key: Path | None, as_json: bool) -> None:
    """Check a bundle on this device, without torch: hashes, tokenizer, and every variant's parity.

    Runs the stored probes and compares with the stored PyTorch outputs under the thresholds in the
    manifest (the export's defaults and any --tolerance the exporter chose). Exit 0 when everything passes,
    3 otherwise (a tampered or missing file included).
    """
    from .verify import verify_bundle

    report = verify_bundle(bundle, list(variants) or None, list(providers) or None, threads, probe_texts, trusted_key)
    if plot is not None:
        from .plot import write_error_plot

        write_plot(write_error_plot, report, plot, svg_without_matplotlib=True)
    if as_json:
        emit_json(report)
    else:
        for p in report["integrity"]["problems"]:
            click.echo(f"  integrity FAIL  {p}")
        for name, r in report["variants"].items():
            extra = ""
            if r.get("adapters") is not None:
                ok = sum(a["passed"] for a in r["adapters"].values())
                extra = (f"  (base + {ok}/{len(r['adapters'])} adapters, switching "
                         f"{'ok' if r.get('switching', {}).get('passed') else 'FAILED'})")
            if r.get("ort"):
                extra += f"  (and {r['ort']['file']}: {'PASS' if r['ort']['passed'] else 'FAIL'})"
            click.echo(f"  {name:5s} {'PASS' if r['passed'] else 'FAIL'}{extra}")
            for f in r["failures"]:
                click.echo(f"        {f}")
        user = report.get("user_probes")
        if user:
            click.echo(f"  your probes: {user['count']} texts from {user['file']}, each quantized variant vs fp32: "
                       + (", ".join(f"{v} {'PASS' if r['passed'] else 'FAIL'}" for v, r in user["variants"].items())
                          or "no quantized variant"))
            for p in user.get("problems", []):
                click.echo(f"        {p}")
        sig = report["signature"]
        click.echo("  signature " + (f"valid, key {sig['key_id']}" if sig["checked"] else
                                     "present, not checked (pass --trusted-key)" if sig["signed"] else
                                     "none: integrity against accidents only (export --sign for authenticity)"))
        exported = (report.get("exported_on") or {}).get("isa")
        click.echo(f"  cpu   {report['cpu']['isa']}" + (f" (the export was verified on {exported})" if exported else ""))
        click.echo(f"{bundle}: {'verified' if report['passed'] else 'VERIFICATION FAILED'}")
    if not report["passed"]:
        sys.exit(EXIT_PARITY)


def write_plot(writer, data: dict[str, Any], plot: Path, svg_without_matplotlib: bool = False) -> None:
    """--plot of verify (SVG drawn here, PNG through matplotlib) and bench (matplotlib). Nothing to plot is a
    warning: the command's own result (a failed verify's exit 3 included) still comes."""
    svg = svg_without_matplotlib and plot.suffix.lower() != ".png"
    if not svg:
        from .plot import plot_available

        if not plot_available():
            raise UserInputError(f"--plot {plot.name} needs matplotlib: pip install matplotlib (or "
                                 f"export-adapter[plot])" + ("; or give a .svg file" if svg_without_matplotlib else ""))
    if not writer(data, plot):
        click.echo(f"warning: --plot: nothing to plot (no variant kept an error distribution); {plot} not written",
                   err=True)
        return
    click.echo(f"plot: {plot}", err=True)


def one_line(value: str) -> str:
    """A value from a bundle or an input, printed on one line: control characters shown escaped (a label with
    \\r or \\n could otherwise forge output lines)."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(value))


def read_inputs(texts: tuple[str, ...], input_file: Path | None) -> list[str]:
    if texts and input_file:
        raise click.UsageError("give TEXT arguments or --input, not both")
    if input_file is None:
        if not texts:
            raise click.UsageError("give at least one TEXT or --input FILE.jsonl")
        for t in texts:
            try:
                t.encode("utf-8")
            except UnicodeEncodeError:  # bytes the terminal's locale could not decode arrive as surrogates
                raise click.UsageError(f"argument {t.encode('utf-8', 'replace').decode()!r} is not valid UTF-8; "
                                       "pass UTF-8 text (or --input FILE)") from None
        return list(texts)

    try:
        lines = input_file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserInputError(f"{input_file}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise UserInputError(f"{input_file}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UserInputError(f"{input_file}:{n}: not JSON; each line must be a string or {{\"text\": ...}}") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise UserInputError(f"{input_file}:{n}: no \"text\" string on this line")
        out.append(text)
    return out


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("--input", "input_file", type=click.Path(path_type=Path),
              help="JSON Lines file: one string or {\"text\": ...} per line.")
@click.option("--variant", default=None, help="Variant to run. Default: the bundle's default (int8 when it passed).")
@ADAPTER
@THREADS
@ORT_FORMAT
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON on stdout.")
def infer(bundle: Path, texts: tuple[str, ...], input_file: Path | None, variant: str | None, adapter: str | None,
          threads: int | None, ort_format: bool, as_json: bool) -> None:
    """Run a bundle on texts, without torch: labels with scores, token labels, or embeddings."""
    from .runtime import BundleModel

    inputs = read_inputs(texts, input_file)
    model = BundleModel(bundle, variant, threads=threads, adapter=adapter, ort_format=ort_format)
    results = model.infer(inputs)
    if as_json:
        emit_json({"variant": model.variant, "adapter": model.adapter, "task": model.task, "results": results})
        return
    for r in results:
        text = one_line(r["text"])
        if "label" in r:
            click.echo(f"{one_line(r['label'])}\t{r['score']:.4f}\t{text}")
        elif "tokens" in r:
            tags = " ".join(f"{one_line(t['token'])}/{one_line(t['label'])}" for t in r["tokens"])
            click.echo(f"{text}\n  {tags}")
        else:
            e = r["embedding"]
            head = ", ".join(f"{x:.4f}" for x in e[:4])
            click.echo(f"[{head}, ...] (dim {len(e)})\t{text}")


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--variant", default=None, help="Variant to run (fp32, int8, int4, fp16). Default: the bundle's default.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 is greedy; above 0 samples.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling mass (with --temperature > 0).")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option("--stop", "stop", multiple=True, help="Stop string; repeatable.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template (needs jinja2).")
@ADAPTER
@THREADS
@ORT_FORMAT
def generate(bundle: Path, prompt: str, max_new_tokens: int, variant: str | None, temperature: float, top_p: float,
             seed: int | None, stop: tuple[str, ...], chat: bool, adapter: str | None, threads: int | None,
             ort_format: bool) -> None:
    """Generate text with a decoder bundle, without torch, streaming tokens to stdout (KV cache)."""
    from .runtime import BundleGenerator

    gen = BundleGenerator(bundle, variant, threads=threads, adapter=adapter, ort_format=ort_format)
    for piece in gen.stream(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, stop=list(stop), chat=chat):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print as JSON on stdout.")
def inspect(path: Path, as_json: bool) -> None:
    """Show what an adapter folder or a bundle holds (base, task, rank, targets, variants). No torch needed."""
    from .inspection import inspect_path

    info = inspect_path(path)
    if as_json:
        emit_json(info)
        return
    for key, value in info.items():
        if isinstance(value, dict):
            click.echo(f"{key}:")
            for k, v in value.items():
                click.echo(f"  {k}: {v}")
        else:
            click.echo(f"{key}: {value}")


def _shape(text: str) -> tuple[int, int]:
    b, sep, s = text.lower().partition("x")
    if not sep or not b.strip().isdigit() or not s.strip().isdigit():
        raise click.BadParameter(f"{text!r}: write BATCHxSEQUENCE, e.g. 8x128", param_hint="--shape")
    return int(b), int(s)


def parse_config_entry(text: str) -> tuple[str, str]:
    """--session-config KEY=VALUE (bench, export)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r}: write KEY=VALUE, e.g. session.intra_op.allow_spinning=0",
                                 param_hint="--session-config")
    return key.strip(), value.strip()


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variant(s) to time. Default: all.")
@click.option("--shape", "shapes", multiple=True, metavar="BxS",
              help="Encoders: batch x sequence length, repeatable. Default: 1x16, 1x128, 8x128.")
@click.option("--context", "contexts", multiple=True, type=click.IntRange(min=1),
              help="Decoders: time a prefill of N tokens and one decode step after N cached ones; repeatable. "
                   "Default: 128.")
@click.option("--rounds", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed rounds (each runs every case on every variant once, interleaved).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed rounds first.")
@THREADS
@click.option("--session-config", "session_config", multiple=True, metavar="KEY=VALUE",
              help="onnxruntime session config entry, repeatable (e.g. session.intra_op.allow_spinning=0).")
@ADAPTER
@ORT_FORMAT
@click.option("--no-memory", is_flag=True,
              help="Skip the fresh process per variant that measures session load time and peak RSS.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Also draw the latencies into this PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print every measurement as JSON on stdout.")
def bench(bundle: Path, variants: tuple[str, ...], shapes: tuple[str, ...], contexts: tuple[int, ...], rounds: int,
          warmup: int, threads: int | None, session_config: tuple[str, ...], adapter: str | None, ort_format: bool,
          no_memory: bool, plot: Path | None, as_json: bool) -> None:
    """Time each variant of a bundle on this CPU, without torch: latency p50/p90 and throughput per shape,
    file size, session load time and peak RSS.

    The variants run interleaved in one process (one call each per case per round), so load on the machine
    hits them alike; load time and peak RSS come from a fresh process per variant. Inputs are synthetic
    (token ids from the vocabulary, a random KV cache). Decoders are timed at a prefill and a decode step.
    """
    from .bench import BenchSpec, run_bench

    spec = BenchSpec(bundle, tuple(variants), tuple(_shape(s) for s in shapes), tuple(contexts), rounds, warmup, threads,
                     tuple(parse_config_entry(c) for c in session_config), adapter, ort_format, not no_memory)
    result = run_bench(spec, progress=lambda m: click.echo(m, err=True))
    if plot is not None:
        from .plot import write_bench_plot

        write_plot(write_bench_plot, result, plot)
    if as_json:
        emit_json(result)
        return
    config = ", ".join(f"{k}={v}" for k, v in result["session_config"].items())
    click.echo(f"bundle: {bundle}  ({result['task']}; {result['cpu']['isa']}, {result['cpu']['model']}; "
               f"onnxruntime {result['onnxruntime']}; threads {result['threads'] or 'default'} of "
               f"{result['cores']} cores{'; ' + config if config else ''}; {result['rounds']} rounds)")
    click.echo(f"  {'variant':8s} {'file MB':>8s} {'load s':>7s} {'peak RSS MiB':>13s}")
    for v, i in result["variants"].items():
        load = f"{i['load_s']:7.2f}" if "load_s" in i else f"{'-':>7s}"
        rss = f"{i['peak_rss_mb']:13.0f}" if "peak_rss_mb" in i else f"{'-':>13s}"
        click.echo(f"  {v:8s} {i['size_mb']:8.1f} {load} {rss}")
    click.echo(f"  {'case':12s} {'variant':8s} {'p50 ms':>8s} {'p90 ms':>8s} {'throughput':>15s} {'vs fp32':>8s}")
    last = None
    for r in result["cases"]:
        case = r["case"] if r["case"] != last else ""
        last = r["case"]
        ratio = f"{r['vs_fp32']:7.2f}x" if r["vs_fp32"] is not None else f"{'-':>8s}"
        click.echo(f"  {case:12s} {r['variant']:8s} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} "
                   f"{r['throughput']:9.1f} {r['unit']:5s} {ratio}")


def print_summary(report: dict[str, Any], out: Path) -> None:
    """The human summary of an export or add-adapter Report (the JSON is --json's)."""
    from .report import gate_cells

    click.echo(f"bundle: {out}  ({report['task']}, base {report['base']['name']})")
    sizes = report.get("sizes") or {}
    for name, r in report["variants"].items():
        size = f"{sizes[name] / 1e6:8.1f} MB" if name in sizes else ""
        click.echo(f"  {name:5s} {'PASS' if r['passed'] else 'FAIL'}  {size}")
        for output, m in r["outputs"].items():
            gated, _ = gate_cells(m, r["thresholds"], r.get("user_tolerances") or {})
            click.echo(f"        {output}: {'; '.join(gated) or '-'}")
        if r.get("base_not_gated"):
            click.echo("        base without adapter: reported, not gated (untrained head; fp32 is gated)")
        for adapter, a in (r.get("adapters") or {}).items():
            worst = max((m["max_abs_diff"] or float("inf") for m in a["outputs"].values()), default=float("nan"))
            click.echo(f"        adapter {adapter}: {'PASS' if a['passed'] else 'FAIL'}  max abs diff {worst:.2e}")
        if r.get("ort"):
            o = r["ort"]
            worst = max((m.get("max_abs_diff") or 0.0 for m in o["outputs"].values()), default=float("nan"))
            click.echo(f"        ORT format {o['file']}: {'PASS' if o['passed'] else 'FAIL'}  max abs diff {worst:.2e}")
        if "switching" in r:
            sw = r["switching"]
            click.echo(f"        switching {sw['configurations']} configurations: {'PASS' if sw['passed'] else 'FAIL'}  "
                       f"max abs diff {sw['max_abs_diff']:.2e}")
        for f in r["failures"]:
            click.echo(f"        {f}")
    tm = report.get("task_metrics")
    if tm:
        shown = ", ".join(f"{v} {m['value']:.4f} (-{m.get('worse', 0)}/+{m.get('better', 0)})"
                          for v, m in tm["variants"].items())
        click.echo(f"  {tm['metric']} on {tm['n_examples']} eval examples: PyTorch {tm['torch']:.4f}, {shown} "
                   f"(max drop {tm['max_drop']} unless not significant; -worse/+better {tm.get('units', 'units')})")
    for w in report.get("warnings") or []:
        click.echo(f"warning: {w}", err=True)
