"""``run_pipeline(spec) -> Report``: the stage order, and nothing else.

load → merge → export → quantize → verify → bundle. Everything is written in a staging folder beside OUT;
only a fully verified bundle is renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .bundle import (
    BASE_OUTPUTS_NPZ,
    INPUTS_NPZ,
    OUTPUTS_NPZ,
    PROBES_JSON,
    REFERENCE_DIR,
    SCHEMA_VERSION,
    check_out,
    file_hashes,
    make_staging,
    output_lock,
    publish,
    reject,
    write_json,
    write_manifest,
)
from .cpu import cpu_features
from .errors import (
    ExporterError,
    FileSystemError,
    MismatchError,
    ParityError,
    UserInputError,
    describe_os_error,
    require_full,
)
from .export import DEFAULT_OPSET, MIN_ORT_FOR_OPSET
from .probes import DEFAULT_MAX_LENGTH, MIN_VOCAB
from .quantize import QUANTIZE_MODES
from .report import write_report
from .taskeval import PRIMARY_METRIC, TaskEvalSpec, judge, run_engine
from .taskeval import prepare as prepare_eval
from .tolerances import required_effect

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class ExportSpec:
    adapter: Path
    out: Path
    base: str | None = None
    revision: str | None = None
    task: str | None = None
    labels: tuple[str, ...] | None = None
    quantize: tuple[str, ...] = ("int8",)
    opset: int = DEFAULT_OPSET
    overwrite: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    # From `run`: the user's eval rows for task-level parity (only metrics reach the bundle), the effective
    # recipe to store as recipe.yaml, and whether to ship the trained adapter folder inside the bundle.
    task_eval: TaskEvalSpec | None = field(default=None, repr=False)
    recipe_yaml: str | None = field(default=None, repr=False)
    include_adapter: bool = False
    int4_block_size: int = 32
    int4_embedding: bool = False
    no_tokenizer: bool = False  # export a base that ships no tokenizer; probes are synthetic token ids
    training: dict[str, Any] | None = field(default=None, repr=False)  # from `run`: fine-tuning summary
    # --keep-adapters: (name, folder) of every adapter; the graph keeps LoRA as inputs, adapters become
    # adapters/NAME.onnx_adapter files. ``adapter`` is then the first of them.
    adapters: tuple[tuple[str, Path], ...] = ()
    keep_adapters: bool = False
    # export --probe-texts: the user's own texts (encoders) or prompts (decoders) to judge parity on.
    probe_texts: Path | None = None
    # export --tolerance [VARIANT.]NAME=VALUE: the user's own thresholds, recorded in the manifest and the report.
    tolerances: tuple[tuple[str, float], ...] = ()
    # export --sign KEY: an Ed25519 private key (PEM); the bundle gets manifest.json.sig (exporter/signing.py).
    sign: Path | None = None

    def recorded(self) -> dict[str, Any]:
        """The effective settings as written into the bundle: no machine paths, no eval data."""
        d = asdict(self)
        d.pop("task_eval")
        d.pop("recipe_yaml")
        d.pop("training")
        d["task_eval_rows"] = len(self.task_eval.rows) if self.task_eval else None
        d["adapter"] = Path(self.adapter).resolve().name
        d["adapters"] = [name for name, _ in self.adapters]
        d["out"] = Path(self.out).name
        d["labels"] = list(self.labels) if self.labels else None
        d["quantize"] = list(self.quantize)
        d["probe_texts"] = Path(self.probe_texts).name if self.probe_texts else None
        d["sign"] = self.sign is not None  # never the key's path
        return d


@dataclass(frozen=True)
class Report:
    data: dict[str, Any] = field(repr=False)

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])


def normalize_modes(modes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for m in modes:
        if m == "none":
            continue
        if m not in QUANTIZE_MODES:
            raise UserInputError(f"--quantize {m}: unknown mode; use one of: {', '.join(QUANTIZE_MODES)}, none")
        if m not in out:
            out.append(m)
    return tuple(out)


def _versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import peft
    import tokenizers
    import torch
    import transformers

    return {
        "export_adapter": __version__, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "peft": peft.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "tokenizers": tokenizers.__version__, "numpy": numpy.__version__,
    }


class _Stages:
    """Times each stage and reports it on the progress callback."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress or (lambda msg: log.info(msg))
        self.timings: dict[str, float] = {}

    def run(self, name: str, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from .interrupts import check

        check()
        self.progress(f"{what} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        check()
        self.timings[name] = round(time.perf_counter() - t0, 3)
        self.progress(f"{what}: done in {self.timings[name]:.1f}s")
        return result


def run_pipeline(spec: ExportSpec, progress: Progress | None = None) -> Report:
    require_full("export")
    from .loading import check_architecture, inspect_adapter, resolve_base
    from .tasks import get_arch, get_task

    modes = normalize_modes(spec.quantize)
    if spec.opset not in MIN_ORT_FOR_OPSET:
        raise UserInputError(f"--opset {spec.opset}: not supported; use one of {sorted(MIN_ORT_FOR_OPSET)}")
    out = Path(spec.out)
    check_out(out, spec.overwrite, export_inputs(spec))
    if spec.sign is not None:  # a wrong key fails now, not after the export
        from .signing import load_private_key

        load_private_key(spec.sign)
    stages = _Stages(progress)
    if spec.keep_adapters:
        return _run_swappable(spec, modes, stages, out)
    if spec.adapters and len(spec.adapters) > 1:
        raise UserInputError("several --adapter options need --keep-adapters (one graph, swappable adapters); "
                             "a merged export takes one adapter")
    adapter = stages.run("inspect", "inspecting adapter", lambda: inspect_adapter(Path(spec.adapter), spec.allow_pickle))
    base = resolve_base(spec.base, adapter, spec.revision)
    check_architecture(base, spec.trust_remote_code)
    arch = get_arch(base.model_type)
    task = get_task(_choose_task(spec, adapter, base))
    if spec.no_tokenizer and task.name == "text-generation":
        raise UserInputError("--no-tokenizer is for encoder tasks; a text-generation bundle needs its tokenizer")
    if "int4" in modes and task.name != "text-generation":
        raise UserInputError("--quantize int4 is for text-generation models; use int8 or fp16 for encoders")
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)
    build = _build_decoder if task.name == "text-generation" else _build

    def hint(report: dict[str, Any]) -> str:
        failed = [v for v, r in report["variants"].items() if not r["passed"]]
        others = [m for m in ("int8", "fp16") if m not in failed]
        return (f"; fp32 passed: export without {', '.join(failed)} (--quantize {others[0] if others else 'none'})"
                if "fp32" not in failed else "")

    return _staged(out, spec.overwrite,
                   lambda staging: build(spec, modes, stages, adapter, base, arch, task, staging), hint)


def export_inputs(spec: ExportSpec) -> tuple[Path, ...]:
    """The files and folders an export reads, which OUT must not contain (--overwrite would delete them)."""
    items = [Path(spec.adapter), *(Path(p) for _, p in spec.adapters)]
    if spec.base and not spec.base.startswith("embedded:") and Path(spec.base).exists():
        items.append(Path(spec.base))
    if spec.probe_texts:
        items.append(Path(spec.probe_texts))
    return tuple(items)


def check_tolerances(task: str, modes: tuple[str, ...], overrides: tuple[tuple[str, float], ...]) -> None:
    from .tolerances import check_overrides

    problem = check_overrides(task, ("fp32", *modes), overrides)
    if problem:
        raise UserInputError(problem)


def _staged(out: Path, overwrite: bool, build: Callable[[Path], dict[str, Any]],
            hint: Callable[[dict[str, Any]], str] = lambda report: "") -> Report:
    """Build in a staging folder beside OUT; publish it when every gate passed, else keep it as OUT.rejected."""
    with output_lock(out), quiet_libraries():
        try:
            staging = make_staging(out)
        except OSError as e:
            raise _disk_error(e, out) from None
        try:
            report = build(staging)
            if report["passed"]:
                publish(staging, out, overwrite)
            else:
                rejected = reject(staging, out)
                raise ParityError(
                    f"parity gate failed ({'; '.join(_first_failures(report))}); nothing was written to {out}, "
                    f"diagnostics are in {rejected}{hint(report)}",
                    report,
                )
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise _disk_error(e, out) from None
        except (UserInputError, ParityError):
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except ExporterError as e:
            # A library that hit a full disk often reports something else (onnx: "wire format was corrupt" on
            # the truncated file it wrote): when the staging filesystem is full, that is the cause to name.
            full = _filesystem_full(staging)
            shutil.rmtree(staging, ignore_errors=True)
            if full:
                raise _disk_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), out) from e
            raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Report(report)


def _filesystem_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < FULL_BYTES or (st.f_files > 0 and st.f_favail == 0)


# A filesystem with less than this free is full for our purposes: no graph or tensor file fits.
FULL_BYTES = 1 << 20


def _run_swappable(spec: ExportSpec, modes: tuple[str, ...], stages: _Stages, out: Path) -> Report:
    """export --keep-adapters: check every adapter fits one base and one task, then build and publish."""
    from .loading import check_architecture, inspect_adapter, public_base_name, resolve_base
    from .swap_build import build_swappable, check_adapter_name
    from .tasks import get_arch, get_task

    if spec.task_eval is not None or spec.include_adapter:
        raise UserInputError("--keep-adapters is an export option: task-level parity and shipping the adapter "
                             "folder (run) apply to merged bundles only")
    pairs = [(n, Path(p)) for n, p in spec.adapters] or [(Path(spec.adapter).resolve().name, Path(spec.adapter))]
    seen: set[str] = set()
    for name, _ in pairs:
        check_adapter_name(name)
        if name in seen:
            raise UserInputError(f"two adapters are named {name}; name them with --adapter NAME=PATH")
        seen.add(name)
    adapters = [(name, stages.run(f"inspect_{name}", f"inspecting adapter {name}", inspect_adapter, Path(path),
                                  spec.allow_pickle)) for name, path in pairs]
    base = resolve_base(spec.base, adapters[0][1], spec.revision)
    for name, ref in adapters:
        recorded = public_base_name(ref.recorded_base)
        if spec.base is None and recorded and recorded != base.name:
            raise MismatchError(f"adapter {name} was trained for {recorded}, adapter {adapters[0][0]} for {base.name}; "
                                "swappable adapters share one base")
    check_architecture(base, spec.trust_remote_code)
    arch = get_arch(base.model_type)
    tasks = {name: _choose_task(spec, ref, base) for name, ref in adapters}
    if len(set(tasks.values())) > 1:
        raise MismatchError("the adapters are for different tasks (" + ", ".join(f"{n}: {t}" for n, t in tasks.items())
                            + "); one bundle serves one task")
    task = get_task(next(iter(tasks.values())))
    if "int4" in modes and task.name != "text-generation":
        raise UserInputError("--quantize int4 is for text-generation models; use int8 or fp16 for encoders")
    check_tolerances(task.name, modes, spec.tolerances)
    check_free_space(base, modes, out)
    return _staged(out, spec.overwrite,
                   lambda staging: build_swappable(spec, modes, stages, adapters, base, arch, task, staging))


def _disk_error(e: OSError, out: Path) -> ExporterError:
    """A write that failed halfway: one line naming the cause and the fix (staging is already removed). The
    staging folder's own path is gone by now, so the message names the bundle file and the folder OUT goes in."""
    where, member = out.absolute().parent, None
    if e.filename:
        failed = Path(str(e.filename)).absolute()
        if where in failed.parents:
            parts = failed.relative_to(where).parts
            if parts[0].startswith(f".{out.name}.staging"):
                member = "/".join(parts[1:]) or None
        else:  # a file outside OUT's folder (a library's temporary file)
            where = failed
    what = f"the bundle ({member})" if member else "the bundle"
    return FileSystemError(f"cannot write {what}: {describe_os_error(e, where)} (nothing was written to {out})")


# Export needs room for the fp32 graph and each variant beside it (staging), plus slack for the reference.
VARIANT_SIZE_FACTOR = {"fp32": 1.0, "fp16": 0.5, "int8": 0.3, "int4": 0.2}


def check_free_space(base, modes: tuple[str, ...], out: Path) -> None:
    """Refuse up front when the output's filesystem cannot hold the bundle: inodes always, bytes for local bases
    (estimated from their weight files)."""
    target = next((p for p in (out.resolve().parent, *out.resolve().parents) if p.exists()), Path.cwd())
    st = os.statvfs(target)
    if st.f_files > 0 and st.f_favail < BUNDLE_INODES:
        raise FileSystemError(f"no free inodes in {target} ({st.f_favail} left, a bundle needs about "
                              f"{BUNDLE_INODES}); delete files there or choose another -o")
    if not base.is_local:
        return
    weights = sum(f.stat().st_size for f in Path(base.location).glob("*.safetensors"))
    need = int(weights * sum(VARIANT_SIZE_FACTOR[m] for m in ("fp32", *modes)) * 1.1) + 50_000_000
    free = shutil.disk_usage(target).free
    if free < need:
        raise FileSystemError(
            f"not enough free space in {target}: the bundle needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
            "is free; free space or choose another -o"
        )


# Files and folders of a bundle with staging and lock (a swappable bundle with many adapters has more; the
# write itself then reports the shortage).
BUNDLE_INODES = 64


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' load reports and progress bars would bury our progress and one-line errors on stderr."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    onnx_log = logging.getLogger("torch.onnx")
    onnx_level = onnx_log.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed" notices from the exporter's registry
    try:
        with warnings.catch_warnings():
            # peft's note that it resolved our embedded: base name, transformers' deprecation notices.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"peft\.")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        onnx_log.setLevel(onnx_level)
        if bars:
            hf_logging.enable_progress_bar()


def _score_variants(staging: Path, artifacts: dict, eval_set, torch_metrics: dict, spec: TaskEvalSpec,
                    results: dict, logits: Callable | None = None) -> dict[str, Any]:
    """Each variant's task metric next to PyTorch's; a drop over the recipe's tolerance fails the variant.

    ``logits(session, feeds)`` runs one eval batch (default: the graph's inputs are the feeds).
    """
    from .runtime import make_session

    logits = logits or (lambda session, feeds: session.run(["logits"], feeds)[0])
    variant_metrics = {}
    for name, art in artifacts.items():
        session = make_session(art.path)
        variant_metrics[name] = run_engine(eval_set, lambda f, s=session: logits(s, f))
    judged = judge(eval_set.task, torch_metrics, variant_metrics, spec.max_metric_drop, len(spec.rows))
    for name, v in judged["variants"].items():
        if not v["passed"]:
            results[name]["passed"] = False
            results[name]["failures"].append(
                f"task metric {judged['metric']} {v['value']:.4f} vs PyTorch {judged['torch']:.4f}: drop "
                f"{v['drop']:.4f} > {spec.max_metric_drop}, and it is real: {v['worse']} {judged['units']} got "
                f"worse, {v['better']} better (McNemar p = {v['p_value']:.3g} < {judged['significance']})"
            )
    return judged


def _first_failures(report: dict[str, Any]) -> list[str]:
    return [f"{v}: {r['failures'][0]}" for v, r in report["variants"].items() if r["failures"]][:3]


def _choose_task(spec: ExportSpec, adapter, base) -> str:
    from .tasks import TASKS, task_from_peft

    if spec.task:
        return spec.task
    from_adapter = task_from_peft(adapter.task_type)
    if from_adapter:
        return from_adapter
    archs = base.config.get("architectures") or []
    for a in archs:
        if a.endswith(("ForCausalLM", "LMHeadModel")):
            return "text-generation"
        if a.endswith("ForSequenceClassification"):
            return "text-classification"
        if a.endswith("ForTokenClassification"):
            return "token-classification"
    if archs and all(a.endswith("Model") for a in archs):
        return "feature-extraction"
    raise UserInputError(
        f"cannot tell the task from the adapter (task_type {adapter.task_type}) or the base; pass --task "
        f"({', '.join(sorted(TASKS))})"
    )


TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")


def _save_tokenizer(base, adapter, staging: Path, trust_remote_code: bool):
    """The adapter's own tokenizer when it ships one (added tokens), else the base's; saved as tokenizer.json.

    Returns the transformers tokenizer and where its pad token came from ("tokenizer" or "eos").
    """

    from .merge import adapter_vocab_size

    if any((adapter.path / f).is_file() for f in TOKENIZER_FILES):
        return _load_tokenizer(adapter.path, f"adapter {adapter.name}", base.config.get("vocab_size"),
                               adapter_vocab_size(adapter), staging, {})
    if base.is_local and not any((Path(base.location) / f).is_file() for f in TOKENIZER_FILES):
        # transformers 5 silently builds an empty-vocabulary tokenizer here; that bundle would be garbage.
        raise UserInputError(
            f"base {base.name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) in {base.location}; "
            "copy the model's tokenizer into that folder, or pass --no-tokenizer to export without one"
        )
    kwargs: dict[str, Any] = {"revision": base.revision} if base.revision else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    return _load_tokenizer(base.location, f"base {base.name}", base.config.get("vocab_size"),
                           adapter_vocab_size(adapter), staging, kwargs)


def _load_tokenizer(location, what: str, base_vocab: int | None, adapter_vocab: int | None, staging: Path,
                    kwargs: dict[str, Any]):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(location), use_fast=True, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a malformed tokenizer.json surfaces as KeyError, TypeError, a
        # bare Exception from tokenizers or a Rust panic (a BaseException); all mean "this file is broken"
        first = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise UserInputError(f"{what}: no usable tokenizer ({type(e).__name__}: {first}); fix or remove its "
                             "tokenizer files") from None
    if not getattr(tok, "is_fast", False):
        raise UserInputError(f"{what}: the tokenizer cannot be converted to tokenizer.json (no fast version)")
    pad_source = "tokenizer"
    if tok.pad_token is None:
        # GPT-2, Llama, Mistral and TinyLlama ship without one; padding with EOS is what transformers users
        # do. Padded positions are masked out, so the choice does not change any output (recorded).
        if tok.eos_token is None:
            raise UserInputError(f"{what}: the tokenizer has neither a pad nor an EOS token, so batches cannot be "
                                 "padded; set tokenizer.pad_token and save it with the model")
        tok.pad_token = tok.eos_token
        pad_source = "eos"
    if len(tok) < MIN_VOCAB:
        raise UserInputError(f"{what}: the tokenizer's vocabulary has only {len(tok)} tokens, so it is empty or "
                             "broken; use the model's own tokenizer files")
    vocab_size = adapter_vocab or base_vocab
    if vocab_size and len(tok) > vocab_size:
        raise UserInputError(
            f"{what}: the tokenizer has {len(tok)} tokens but the model only {vocab_size} embeddings; use the "
            "model's own tokenizer (an adapter that adds tokens must ship its tokenizer and embedding matrix)"
        )
    tok.save_pretrained(str(staging))
    return tok, pad_source


def probe_texts(spec: ExportSpec, fast_tok, family: str, warnings: list[str]):
    """The texts parity runs on: --probe-texts, else the built-in ones, else texts made from the vocabulary."""
    from .formats import read_text
    from .probes import MAX_USER_PROBES, select_probe_texts

    user = None
    if spec.probe_texts is not None:
        from .probes import parse_probe_file

        limit = MAX_USER_PROBES[family]
        user, total = parse_probe_file(read_text(Path(spec.probe_texts), "probe file"), str(spec.probe_texts),
                                       limit)
        if total > limit:
            warnings.append(f"--probe-texts: used the first {limit} of {total} texts (parity re-runs them on every "
                            "variant and on the device)")
    return select_probe_texts(fast_tok, family, user, warnings)


def encoder_probes(spec: ExportSpec, fast_tok, names: tuple[str, ...], max_length: int, warnings: list[str]):
    """The encoder probe batches and the texts they hold (built-in mix, the user's, or vocabulary texts)."""
    from .probes import PROBE_BATCHES, build_probes, user_batches

    texts = probe_texts(spec, fast_tok, "encoder", warnings)
    batches = user_batches(len(texts.texts)) if texts.source == "user" else PROBE_BATCHES
    return build_probes(fast_tok, names, max_length, texts.texts, batches), texts


def _build(spec, modes, stages: _Stages, adapter, base, arch, task, staging: Path) -> dict[str, Any]:
    from .export import example_feeds, export_onnx, make_wrapper, run_torch
    from .loading import pooling_config
    from .merge import apply_adapter, load_base_model, merge, resolve_labels
    from .parity import OutputInfo, adapter_effect
    from .probes import load_tokenizer, save_arrays, synthetic_probes
    from .tasks import input_names as task_inputs
    from .verify import evaluate_variants

    warnings: list[str] = []
    limits = [spec.max_length, base.config.get("max_position_embeddings", spec.max_length)
              - (2 if base.model_type in ("roberta", "xlm-roberta") else 0)]
    names = task_inputs(arch, base.config.get("type_vocab_size"))
    if spec.no_tokenizer:
        tok = fast_tok = None
        pad_source = texts = None
        max_length = min(limits)
        probes = synthetic_probes(names, max_length, int(base.config.get("vocab_size", 1000)),
                                  int(base.config.get("pad_token_id") or 0))
        warnings.append("exported without a tokenizer (--no-tokenizer): the probes are synthetic token ids and "
                        "`infer` needs token ids from your own tokenizer")
    else:
        tok, pad_source = stages.run("tokenizer", "saving tokenizer", _save_tokenizer, base, adapter, staging,
                                     spec.trust_remote_code)
        if 0 < tok.model_max_length < 1_000_000:
            limits.append(tok.model_max_length)
        max_length = min(limits)
        fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token)
        probes, texts = encoder_probes(spec, fast_tok, names, max_length, warnings)
    infos = [OutputInfo(o.name, "sequence" in o.axes, o.is_logits) for o in task.outputs]
    output_names = tuple(i.name for i in infos)
    labels = resolve_labels(task, arch, base, adapter, spec.labels)
    pooling = pooling_config(base) if task.name == "feature-extraction" else None

    def build_torch():
        model, info = load_base_model(task, base, labels, spec.trust_remote_code)
        peft_model, w = apply_adapter(model, adapter, base, list(info.get("missing_keys", [])), spec.allow_pickle)
        warnings.extend(w)
        unmerged = make_wrapper(peft_model, task, names, pooling)
        with peft_model.disable_adapter():
            base_out = [run_torch(unmerged, f, output_names) for f in probes.feeds]
        merged = merge(peft_model, base.name)
        return merged, base_out

    merged, base_out = stages.run("merge", "loading base and merging adapter", build_torch)
    wrapper = make_wrapper(merged, task, names, pooling)
    reference = stages.run("reference", "computing PyTorch reference",
                           lambda w: [run_torch(w, f, output_names) for f in probes.feeds], wrapper)
    eval_set = torch_metrics = None
    if spec.task_eval is not None and task.name in PRIMARY_METRIC and fast_tok is not None:
        eval_set = prepare_eval(task.name, spec.task_eval, labels, fast_tok, names)
        torch_metrics = stages.run(
            "task_eval_torch", f"scoring PyTorch on {len(spec.task_eval.rows)} eval rows", run_engine, eval_set,
            lambda f, w=wrapper: run_torch(w, f, output_names)["logits"])
    masks = [f["attention_mask"] for f in probes.feeds]
    effect = adapter_effect(reference, base_out, masks, infos)
    required = required_effect([a for r in reference for a in r.values()])
    meaningful = max(effect.values()) >= required
    if not meaningful:
        warnings.append(
            f"the adapter barely changes the model (max |merged - base| {max(effect.values()):.2g} < {required:g}); "
            "parity cannot show the adapter survived export (an untrained or zero-initialised adapter?)"
        )
    fp32 = stages.run("export", "exporting to ONNX (fp32)", export_onnx, wrapper,
                      example_feeds(probes.feeds[-1]), staging / "model.onnx", task, spec.opset)
    merged.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in merged.parameters())
    # Free the torch model before onnxruntime sessions and quantizers load: peak memory is the max, not the sum.
    del merged, wrapper
    gc.collect()
    artifacts = quantize_all(stages, spec, fp32, modes, staging, decoder=False)

    (staging / REFERENCE_DIR).mkdir()
    write_json(staging / PROBES_JSON, probes.to_json())
    save_arrays(staging / INPUTS_NPZ, list(probes.feeds))
    save_arrays(staging / OUTPUTS_NPZ, reference)
    save_arrays(staging / BASE_OUTPUTS_NPZ, base_out)
    _copy_base_docs(base, staging)

    manifest: dict[str, Any] = {
        **_manifest_head(spec, task, base, adapter, num_parameters),
        **_encoder_fields(task, names, labels, pooling, tok, max_length, pad_source),
        "probes": texts.manifest() if texts else {"source": "synthetic", "count": len(probes.feeds)},
        **_manifest_tail(spec, artifacts, task.name, effect, required, meaningful, decoder=False,
                         base_reference=True),
    }
    results = stages.run("verify", "checking parity with onnxruntime",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    task_metrics = None
    if eval_set is not None:
        task_metrics = stages.run("task_eval_onnx", "scoring ONNX variants on the eval rows", _score_variants,
                                  staging, artifacts, eval_set, torch_metrics, spec.task_eval, results)
    return _finish(staging, spec, modes, manifest, results, warnings, stages, task, artifacts, task_metrics,
                   adapter)


def _encoder_fields(task, names: tuple[str, ...], labels, pooling, tok, max_length: int,
                    pad_source: str | None) -> dict[str, Any]:
    """The manifest's description of an encoder graph: labels, inputs, outputs, pooling, tokenizer."""
    return {
        "labels": list(labels) if labels else None,
        "inputs": [{"name": n, "dtype": "int64", "axes": ["batch", "sequence"]} for n in names],
        "outputs": [{"name": o.name, "dtype": "float32", "axes": list(o.axes), "is_logits": o.is_logits}
                    for o in task.outputs],
        "pooling": pooling,
        "tokenizer": None if tok is None else {"file": "tokenizer.json", "max_length": max_length,
                                               "pad_id": tok.pad_token_id, "pad_token": tok.pad_token,
                                               "pad_source": pad_source},
    }


def _decoder_fields(dio, tok, max_length: int, positions: int, eos_ids: list[int],
                    pad_source: str) -> dict[str, Any]:
    """The manifest's description of a KV-cache decoder graph and what generate needs."""
    chat_template = getattr(tok, "chat_template", None)
    if isinstance(chat_template, str):
        check_chat_template(chat_template, tok)
    return {
        "family": "decoder",
        "labels": None,
        "decoder": dio.to_json(),
        "inputs": [{"name": n, "dtype": "float32" if n.startswith("past") else "int64",
                    "axes": (["batch", "num_kv_heads", "past_sequence", "head_dim"] if n.startswith("past") else
                             ["batch", "total_sequence"] if n == "attention_mask" else ["batch", "sequence"])}
                   for n in dio.input_names],
        "outputs": [{"name": n, "dtype": "float32", "is_logits": n == "logits",
                     "axes": ["batch", "sequence", "vocab"] if n == "logits" else
                     ["batch", "num_kv_heads", "total_sequence", "head_dim"]} for n in dio.output_names],
        "pooling": None,
        "tokenizer": {"file": "tokenizer.json", "max_length": max_length, "pad_id": tok.pad_token_id,
                      "pad_token": tok.pad_token, "pad_source": pad_source, "padding_side": "left"},
        "generation": {"eos_token_ids": eos_ids, "context_length": int(positions),
                       "chat_template": chat_template if isinstance(chat_template, str) else None,
                       "bos_token": tok.bos_token, "eos_token": tok.eos_token},
    }


def check_chat_template(template: str, tok) -> None:
    """Refuse at export a chat template that the device's sandbox would refuse (or that cannot render)."""
    from .errors import BundleError
    from .runtime import render_chat_template

    try:
        render_chat_template(template, [{"role": "user", "content": "Hello"}], bos_token=tok.bos_token or "",
                             eos_token=tok.eos_token or "")
    except BundleError as e:
        raise UserInputError(f"the tokenizer's chat template is refused: {str(e).removeprefix('the chat template ')}; "
                             "remove chat_template from tokenizer_config.json or use the model's own") from None


def eos_token_ids(config, tok) -> list[int]:
    eos = config.eos_token_id
    return sorted({eos} if isinstance(eos, int) else set(eos or [])) or (
        [tok.eos_token_id] if tok.eos_token_id is not None else [])


def choose_prompts(step, dio, fast_tok, names: tuple[str, ...], prompts, singles: list[dict]):
    """Built-in prompts: keep the four whose greedy path is least tied (random test models have near-ties);
    a user's prompts are all kept. Then add one left-padded batch of them all; returns (chosen, batches,
    feeds, greedy runs)."""
    from .generation import greedy
    from .probes import GREEDY_TOKENS, encode

    alone = [greedy(step, dio, f["input_ids"], f["attention_mask"], GREEDY_TOKENS) for f in singles]
    if prompts.source == "user":
        chosen = list(range(len(alone)))
    else:
        chosen = sorted(sorted(range(len(alone)), key=lambda i: -float(alone[i].margins.min()))[:4])
    batches = [(i,) for i in chosen] + [tuple(chosen)]
    feeds = [singles[i] for i in chosen] + [encode(fast_tok, [prompts.texts[i] for i in chosen], names)]
    runs = [alone[i] for i in chosen] + [greedy(step, dio, feeds[-1]["input_ids"], feeds[-1]["attention_mask"],
                                                GREEDY_TOKENS)]
    return chosen, batches, feeds, runs


def quantize_all(stages: _Stages, spec: ExportSpec, fp32, modes: tuple[str, ...], staging: Path,
                 decoder: bool, adapter_modules: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fp32 artifact and one quantized artifact per mode, as the variants of a bundle."""
    from .quantize import quantize

    artifacts = {"fp32": fp32}
    for mode in modes:
        artifacts[mode] = stages.run(f"quantize_{mode}", f"quantizing ({mode})",
                                     lambda m=mode: quantize(fp32, m, staging, decoder=decoder,
                                                             block_size=spec.int4_block_size,
                                                             int4_embedding=spec.int4_embedding,
                                                             adapter_modules=adapter_modules))
    return artifacts


def _manifest_head(spec: ExportSpec, task, base, adapter, num_parameters: int) -> dict[str, Any]:
    """The manifest fields every family shares, first."""
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": f"export-adapter {__version__}",
        "task": task.name,
        "base": {"name": base.name, "revision": base.revision, "model_type": base.model_type},
        "adapter": adapter.summary(),
        "num_parameters": num_parameters,
        "opset": spec.opset,
        "min_onnxruntime": MIN_ORT_FOR_OPSET[spec.opset],
        "onnxruntime_fusions": False,
    }


def _manifest_tail(spec: ExportSpec, artifacts: dict, task: str, effect: dict,
                   required: float, meaningful: bool, decoder: bool, base_reference: bool = False) -> dict[str, Any]:
    """The manifest fields every family shares, last: reference files (``base_reference``: the base model's
    outputs too), variants and their gates."""
    return {
        "reference": {"probes": PROBES_JSON, "inputs": INPUTS_NPZ, "outputs": OUTPUTS_NPZ,
                      **({"base_outputs": BASE_OUTPUTS_NPZ} if base_reference else {})},
        "variants": _variant_entries(artifacts, task, spec, decoder),
        "adapter_effect": {"max_abs_diff": effect, "required_min": required, "meaningful": meaningful},
        "spec": spec.recorded(),
        "versions": _versions(),
        # The CPU the export's parity ran on (verify reports the device's beside it).
        "verified_on": {"cpu": cpu_features()},
    }


def _variant_entries(artifacts: dict, task: str, spec: ExportSpec, decoder: bool) -> dict[str, Any]:
    """The manifest's variants: files, what each holds, and the gate verify must re-apply (the defaults with
    the user's --tolerance overrides, which are recorded beside them)."""
    from .quantize import variant_dtype
    from .tolerances import effective_gate

    entries = {}
    for name, a in artifacts.items():
        thresholds, overridden = effective_gate(task, name, spec.tolerances)
        entries[name] = {"file": a.path.name, "data_files": [d.name for d in a.data_files],
                         "dtype": variant_dtype(name, decoder=decoder, block_size=spec.int4_block_size,
                                                int4_embedding=spec.int4_embedding),
                         "thresholds": thresholds, **({"user_tolerances": overridden} if overridden else {})}
    return entries


def _copy_base_docs(base, staging: Path) -> None:
    """The base's LICENSE/README travel with the bundle (its terms apply to the weights)."""
    from .loading import license_files

    for f in license_files(base):
        (staging / "base_model").mkdir(exist_ok=True)
        shutil.copyfile(f, staging / "base_model" / f.name)


def _finish(staging: Path, spec, modes, manifest: dict[str, Any], results: dict, warnings: list[str],
            stages: _Stages, task, artifacts: dict, task_metrics: dict | None, adapter=None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Verdicts into the manifest, the Report into parity.json/parity.md, hashes last."""
    passed = all(r["passed"] for r in results.values())
    for name, r in results.items():
        manifest["variants"][name]["passed"] = r["passed"]
    passing_quantized = [m for m in modes if results[m]["passed"]]
    manifest["default_variant"] = passing_quantized[0] if passing_quantized else "fp32"
    report = {
        "schema_version": SCHEMA_VERSION,
        "command": "export",
        "tool_version": __version__,
        "passed": passed,
        "bundle": Path(spec.out).name,  # the folder name only: no machine path in the bundle
        "task": task.name,
        "base": manifest["base"],
        "adapter": manifest["adapter"],
        "labels": manifest["labels"],
        "integrity": {"passed": True, "problems": []},
        "variants": results,
        "adapter_effect": manifest["adapter_effect"],
        "warnings": warnings,
        "timings": stages.timings,
        "task_metrics": task_metrics,
        "training": spec.training,
        "sizes": {name: sum((staging / f).stat().st_size for f in [a.path.name, *[d.name for d in a.data_files]])
                  for name, a in artifacts.items()},
        **(extra or {}),
    }
    manifest["task_metrics"] = task_metrics
    if spec.recipe_yaml:
        (staging / "recipe.yaml").write_text(spec.recipe_yaml, encoding="utf-8")
    if spec.include_adapter:
        shutil.copytree(adapter.path, staging / "adapter")
    write_report(staging, report)
    manifest["files"] = file_hashes(staging)
    write_manifest(staging, manifest)
    if spec.sign is not None:
        from .signing import sign_bundle

        report["signed_by"] = sign_bundle(staging, spec.sign)
    return report


def run_recipe(recipe, out: Path, *, overwrite: bool = False, quiet: bool = False,
               progress: Progress | None = None, work_dir: Path | None = None, resume: bool = False) -> Report:
    """finetune -> merge -> export -> quantize -> verify -> bundle, with task-level parity on the eval data."""
    from .finetune import finetune, load_task_data
    from .recipes import effective_yaml

    require_full("run")
    out = Path(out)
    inputs = [Path(p) for p in (recipe.data.train, recipe.data.eval) if p]
    if not recipe.base.startswith("embedded:") and Path(recipe.base).exists():
        inputs.append(Path(recipe.base))
    check_out(out, overwrite, tuple(inputs))
    # Before minutes of fine-tuning: a misspelt threshold fails now.
    check_tolerances(recipe.task, normalize_modes(tuple(recipe.export.quantize)), tuple(recipe.tolerances.gates.items()))
    adapter_dir = out.parent / f".{out.name}.adapter"
    stages = _Stages(progress)
    trained = stages.run("finetune", f"fine-tuning LoRA on {recipe.base}", finetune, recipe, adapter_dir,
                         work_dir=work_dir, resume=resume, overwrite=True, quiet=quiet)
    data = load_task_data(recipe)
    task_eval = None
    if recipe.task in ("text-classification", "token-classification"):
        task_eval = TaskEvalSpec(tuple(data.eval), recipe.data.text_column, recipe.data.label_column,
                                 recipe.tolerances.max_metric_drop)
    elif recipe.task == "text-generation":
        task_eval = TaskEvalSpec(tuple(data.eval), recipe.data.prompt_column, recipe.data.response_column,
                                 recipe.tolerances.max_metric_drop, recipe.training.max_length)
    spec = ExportSpec(
        adapter=adapter_dir, out=out, base=recipe.base, revision=recipe.revision, task=recipe.task,
        labels=tuple(data.labels) if data.labels else None, quantize=tuple(recipe.export.quantize),
        opset=recipe.export.opset, overwrite=overwrite, trust_remote_code=recipe.trust_remote_code,
        task_eval=task_eval, recipe_yaml=effective_yaml(recipe), include_adapter=True,
        tolerances=tuple(recipe.tolerances.gates.items()),
        training={"seconds": stages.timings["finetune"],
                  **{k: trained.metrics.get(k) for k in ("global_step", "train_loss", "eval", "train_rows", "eval_rows",
                                                         "validation_rows", "best_checkpoint", "validation")}},
    )
    try:
        report = run_pipeline(spec, progress)
    finally:
        shutil.rmtree(adapter_dir, ignore_errors=True)
    return report


def _build_decoder(spec, modes, stages: _Stages, adapter, base, arch, task, staging: Path) -> dict[str, Any]:
    """The decoder path: KV-cache export, prompt logits and greedy continuations as the reference."""
    import numpy as np

    from .decoder import conv1d_to_linear, decoder_io, export_decoder, make_decoder_wrapper, torch_step
    from .generation import prefill_feeds, run_arrays
    from .merge import apply_adapter, load_base_model, merge
    from .probes import GREEDY_TOKENS, encode, load_tokenizer, save_arrays
    from .verify import evaluate_variants

    warnings: list[str] = []
    tok, pad_source = stages.run("tokenizer", "saving tokenizer", _save_tokenizer, base, adapter, staging,
                                 spec.trust_remote_code)
    positions = base.config.get("max_position_embeddings") or base.config.get("n_positions") or spec.max_length
    max_length = min(spec.max_length, positions)
    fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token, "left")
    names = ("input_ids", "attention_mask")
    prompts = probe_texts(spec, fast_tok, "decoder", warnings)
    singles = [encode(fast_tok, [p], names) for p in prompts.texts]

    def build_torch():
        import torch

        model, info = load_base_model(task, base, None, spec.trust_remote_code)
        peft_model, w = apply_adapter(model, adapter, base, list(info.get("missing_keys", [])), spec.allow_pickle)
        warnings.extend(w)
        inner = peft_model.get_base_model()
        with peft_model.disable_adapter(), torch.inference_mode():
            base_logits = [inner(input_ids=torch.from_numpy(f["input_ids"]),
                                 attention_mask=torch.from_numpy(f["attention_mask"])).logits.float().numpy()
                           for f in singles]
        merged = merge(peft_model, base.name)
        conv1d_to_linear(merged)  # GPT-2: Gemm would escape int4; Linear exports as MatMul
        return merged, base_logits

    merged, base_logits = stages.run("merge", "loading base and merging adapter", build_torch)
    dio = decoder_io(merged)
    wrapper = make_decoder_wrapper(merged, dio)
    eval_set = torch_metrics = None
    if spec.task_eval is not None:
        eval_set = prepare_decoder_eval(spec.task_eval, staging / "tokenizer.json", tok)
        step = torch_step(wrapper, dio)
        torch_metrics = stages.run(
            "task_eval_torch", f"scoring PyTorch on {len(spec.task_eval.rows)} eval responses", run_engine, eval_set,
            lambda f: step(prefill_feeds(dio, f["input_ids"], f["attention_mask"]))["logits"])

    chosen, batches, feeds, runs = stages.run("reference", "computing PyTorch reference (greedy generation)",
                                              choose_prompts, torch_step(wrapper, dio), dio, fast_tok, names, prompts,
                                              singles)
    merged_singles = [runs[k].prefill_logits for k in range(len(chosen))]
    effect = {"logits": float(max(np.abs(m - base_logits[i]).max() for m, i in zip(merged_singles, chosen)))}
    required = required_effect(merged_singles)
    meaningful = effect["logits"] >= required
    if not meaningful:
        warnings.append(f"the adapter barely changes the model (max |merged - base| {effect['logits']:.2g} < "
                        f"{required:g}); parity cannot show the adapter survived export")
    min_margin = float(min(r.margins.min() for r in runs))
    fp32 = stages.run("export", "exporting to ONNX with KV cache (fp32)", export_decoder, wrapper, dio,
                      staging / "model.onnx", spec.opset)
    merged.config.to_json_file(str(staging / "config.json"))
    num_parameters = sum(p.numel() for p in merged.parameters())
    eos_ids = eos_token_ids(merged.config, tok)
    # Free the torch model before onnxruntime sessions and quantizers load: peak memory is the max, not the sum.
    del merged, wrapper
    gc.collect()
    merged_modules = adapter.changed_modules
    artifacts = quantize_all(stages, spec, fp32, modes, staging, decoder=True, adapter_modules=merged_modules)

    (staging / REFERENCE_DIR).mkdir()
    write_json(staging / PROBES_JSON, {"texts": list(prompts.texts), "batches": [list(b) for b in batches],
                                       "max_length": max_length, "max_new_tokens": GREEDY_TOKENS,
                                       "min_top2_margin": min_margin, "source": prompts.source})
    save_arrays(staging / INPUTS_NPZ, list(feeds))
    save_arrays(staging / OUTPUTS_NPZ, run_arrays(runs))
    # The base's prompt logits exist for the single-prompt batches (the padded batch has none).
    save_arrays(staging / BASE_OUTPUTS_NPZ, [{"logits": base_logits[i].astype(np.float32)} for i in chosen] + [{}])
    _copy_base_docs(base, staging)
    manifest: dict[str, Any] = {
        **_manifest_head(spec, task, base, adapter, num_parameters),
        **_decoder_fields(dio, tok, max_length, positions, eos_ids, pad_source),
        "probes": prompts.manifest(),
        **_manifest_tail(spec, artifacts, task.name, effect, required, meaningful, decoder=True,
                         base_reference=True),
    }
    if "int4" in manifest["variants"]:
        manifest["variants"]["int4"]["modules_8bit"] = list(merged_modules)
    results = stages.run("verify", "checking parity with onnxruntime (logits and greedy tokens)",
                         lambda: evaluate_variants(staging, manifest, list(artifacts)))
    task_metrics = None
    if eval_set is not None:
        def onnx_logits(session, f):
            return session.run(["logits"], prefill_feeds(dio, f["input_ids"], f["attention_mask"]))[0]

        task_metrics = stages.run("task_eval_onnx", "scoring ONNX variants on the eval responses", _score_variants,
                                  staging, artifacts, eval_set, torch_metrics, spec.task_eval, results, onnx_logits)
    return _finish(staging, spec, modes, manifest, results, warnings, stages, task, artifacts, task_metrics,
                   adapter)


def prepare_decoder_eval(spec: TaskEvalSpec, tokenizer_file: Path, tok):
    """The recipe's eval rows as fine-tuning saw them (``runtime.chat_prompt``, then the response and EOS),
    tokenized with the bundle's own tokenizer."""
    from tokenizers import Tokenizer

    from .runtime import chat_prompt
    from .taskeval import prepare_decoder

    template = getattr(tok, "chat_template", None)
    return prepare_decoder(spec, Tokenizer.from_file(str(tokenizer_file)),
                           lambda p: chat_prompt(template, p, tok.bos_token or "", tok.eos_token or ""),
                           tok.eos_token or "", spec.max_length)
