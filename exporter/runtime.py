"""Torch-free inference over a bundle: tokenizers + onnxruntime + numpy.

This is what a device runs; importing torch or transformers here (even indirectly) is a bug, and a test
runs these commands in a process where importing torch fails.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import member_problem, read_manifest
from .errors import BundleError, FileSystemError, TamperedBundleError, UsageError, UserInputError
from .parity import OutputInfo
from .probes import encode, load_tokenizer
from .tasks import family_of


def check_threads(threads: int | None) -> None:
    cores = os.cpu_count() or 1
    if threads is not None and not 1 <= threads <= cores:
        raise UsageError(f"--threads {threads}: this machine has {cores} cores; use 1 to {cores}")


def check_providers(providers: list[str] | None) -> None:
    import onnxruntime as ort

    available = ort.get_available_providers()
    unknown = [p for p in providers or [] if p not in available]
    if unknown:
        raise UsageError(f"execution provider {unknown[0]} is not available here; available: {', '.join(available)}")


def run_session(session, names: list[str], feeds: dict[str, np.ndarray], options=None) -> list[np.ndarray]:
    """session.run, with onnxruntime's errors (wrong input names, shapes, a graph that fails) as one line."""
    try:
        return session.run(names, feeds, options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own InvalidArgument/Fail types
        raise BundleError(f"onnxruntime cannot run the graph ({str(e).splitlines()[0][:160]})") from None


def bundle_session_config(manifest: dict[str, Any], overrides: dict[str, str] | None = None) -> dict[str, str]:
    """The session config entries the manifest records (schema-checked: only formats.SESSION_CONFIG_VALUES),
    with the caller's ``overrides`` on top."""
    return {**(manifest.get("session") or {}).get("config", {}), **(overrides or {})}


def make_session(path: Path, providers: list[str] | None = None, threads: int | None = None,
                 config: dict[str, str] | None = None):
    """An onnxruntime session; ``config``: session config entries (e.g. session.intra_op.allow_spinning=0)."""
    import onnxruntime as ort

    check_threads(threads)
    check_providers(providers)
    opts = ort.SessionOptions()
    # Errors only: a graph with swappable adapters warns once per adapter input that its default initializer
    # "appears in graph inputs" (intended: that is what lets an adapter override it).
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    for key, value in (config or {}).items():
        try:
            opts.add_session_config_entry(key, value)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
            raise UserInputError(f"session config {key}={value}: onnxruntime refuses it ({e})") from None
    chosen = providers or ["CPUExecutionProvider"]
    for f in (path, *path.parent.glob(glob.escape(path.name) + ".data")):
        if not os.access(f, os.R_OK):  # onnxruntime would say only "system error number 13"
            raise FileSystemError(f"{f}: cannot read it (permission denied); check its permissions")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
        raise BundleError(f"{path.name}: onnxruntime cannot load it ({str(e).splitlines()[0][:160]})") from None


def output_infos(manifest: dict[str, Any]) -> list[OutputInfo]:
    return [OutputInfo(o["name"], "sequence" in o["axes"], bool(o["is_logits"])) for o in manifest["outputs"]]


def bundle_tokenizer(root: Path, manifest: dict[str, Any]):
    t = manifest["tokenizer"]
    return load_tokenizer(root / t["file"], t["max_length"], t["pad_id"], t["pad_token"],
                          t.get("padding_side", "right"))


def text_input_names(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The inputs a tokenizer produces (a decoder's other inputs are positions and the KV cache)."""
    names = [i["name"] for i in manifest["inputs"]]
    return tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in names)


def activate_adapter(root: Path, manifest: dict[str, Any], adapter: str | None):
    """The checked, loaded adapter (kept alive with its RunOptions for the model's lifetime), or None."""
    if adapter is None:
        return None
    from .swappable import ActiveAdapters

    return ActiveAdapters(root, manifest, [adapter])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def check_members(root: Path, manifest: dict[str, Any], variant: str) -> None:
    """The files a variant runs from (graph, its data, tokenizer) are regular files inside the bundle: a FIFO
    would block the open for ever, a symlink could point anywhere. Checked before anything opens them."""
    entry = manifest["variants"][variant]
    tok_file = (manifest.get("tokenizer") or {}).get("file")
    ort = [entry["ort_file"]] if entry.get("ort_file") else []
    for rel in [entry["file"], *entry.get("data_files", []), *ort, *([tok_file] if tok_file else [])]:
        problem = member_problem(root, rel)
        if problem:
            raise TamperedBundleError(f"{root}: {problem}; the bundle is damaged, run verify")


def graph_file(root: Path, entry: dict[str, Any], ort_format: bool = False) -> str:
    """The variant's .onnx file, or its .ort file (bundles exported with --ort-format)."""
    if not ort_format:
        return entry["file"]
    if not entry.get("ort_file"):
        raise UserInputError(f"{root}: this bundle has no ORT-format files; export it with --ort-format, or drop "
                             "--ort-format")
    return entry["ort_file"]


class BundleModel:
    """One variant of a bundle, ready for inference: ``BundleModel(path).infer(["some text"])``."""

    def __init__(
        self, root: Path | str, variant: str | None = None, providers: list[str] | None = None,
        threads: int | None = None, adapter: str | None = None, ort_format: bool = False,
    ) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant", "fp32")
        if self.variant not in variants:
            raise UserInputError(f"{self.root}: no variant {self.variant!r}; this bundle has {', '.join(variants)}")
        self.task = self.manifest["task"]
        self.adapter = adapter
        self._active = activate_adapter(self.root, self.manifest, adapter)
        self.labels = self.manifest.get("labels")
        if adapter is not None:
            self.labels = self.manifest["adapters"]["items"][adapter].get("labels") or self.labels
        elif (self.manifest.get("adapters") or {}).get("untrained_base_tensors"):
            names = ", ".join(self.manifest["adapters"]["items"])
            raise UserInputError(f"{self.root}: the base has no trained head; choose an adapter with --adapter "
                                 f"({names})")
        self.input_names = tuple(i["name"] for i in self.manifest["inputs"])
        self.output_names = tuple(o["name"] for o in self.manifest["outputs"])
        entry = variants[self.variant]
        check_members(self.root, self.manifest, self.variant)
        self.tokenizer = bundle_tokenizer(self.root, self.manifest) if self.manifest.get("tokenizer") else None
        self.session = make_session(self.root / graph_file(self.root, entry, ort_format), providers, threads,
                                    bundle_session_config(self.manifest))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in self.input_names if n not in graph_inputs] + \
            [n for n in self.output_names if n not in graph_outputs]
        if missing:
            raise TamperedBundleError(f"{self.root}: the manifest names {missing[0]!r}, which {entry['file']} does "
                                      "not have; the bundle is damaged or tampered with, re-export it")

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            raise UserInputError(f"{self.root}: exported without a tokenizer (--no-tokenizer); tokenize with your "
                                 "own tokenizer and call BundleModel.run with token ids")
        return encode(self.tokenizer, texts, self.input_names)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        options = self._active.run_options if self._active else None
        out = dict(zip(self.output_names, run_session(self.session, list(self.output_names), feeds, options)))
        width = out["logits"].shape[-1] if "logits" in out and self.labels is not None else None
        if width is not None and width != len(self.labels):
            raise TamperedBundleError(f"{self.root}: {len(self.labels)} labels for {width} logits; the bundle is "
                                      "damaged or tampered with, re-export it")
        return out

    def infer(self, texts: list[str]) -> list[dict[str, Any]]:
        if not texts:
            return []
        feeds = self.encode(texts)
        out = self.run(feeds)
        if self.task == "text-classification":
            probs = _softmax(out["logits"])
            return [
                {"text": t, "label": self.labels[int(p.argmax())], "score": float(p.max()),
                 "scores": {lab: float(s) for lab, s in zip(self.labels, p)}}
                for t, p in zip(texts, probs)
            ]
        if self.task == "token-classification":
            probs = _softmax(out["logits"])
            encs = self.tokenizer.encode_batch(texts)
            results = []
            for t, p, enc in zip(texts, probs, encs):
                tokens = []
                for j, (tok, (start, end), special) in enumerate(
                    zip(enc.tokens, enc.offsets, enc.special_tokens_mask)
                ):
                    if special or not enc.attention_mask[j]:
                        continue
                    k = int(p[j].argmax())
                    tokens.append({"token": tok, "start": start, "end": end, "label": self.labels[k],
                                   "score": float(p[j][k])})
                results.append({"text": t, "tokens": tokens})
            return results
        emb = out["sentence_embedding"]
        return [{"text": t, "embedding": [float(x) for x in e]} for t, e in zip(texts, emb)]


def render_chat_template(template: str, messages: list[dict[str, str]], **special: str) -> str:
    """Render a tokenizer's chat template in jinja2's immutable sandbox (templates come from strangers' files).

    Like transformers: trim_blocks/lstrip_blocks, a ``raise_exception`` helper, add_generation_prompt=True.
    A template that reaches for Python internals is refused with one line, never run.
    """
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
    except ImportError:
        raise UserInputError("--chat renders the tokenizer's Jinja chat template: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except SecurityError as e:
        raise BundleError(f"the chat template tried an unsafe operation ({str(e)[:120]}); it was not run") from None
    except TemplateError as e:
        raise BundleError(f"the chat template cannot be rendered ({str(e).splitlines()[0][:120]})") from None


def chat_prompt(template: str | None, prompt: str, bos_token: str = "", eos_token: str = "") -> str:
    """One user turn as fine-tuning, task-level parity and ``generate --chat`` all format it: the chat
    template with the generation prompt, or the prompt and a newline when the tokenizer has no template."""
    if not isinstance(template, str) or not template:
        return prompt + "\n"
    return render_chat_template(template, [{"role": "user", "content": prompt}], bos_token=bos_token,
                                eos_token=eos_token)


def in_place_cache(manifest: dict[str, Any], variant: str) -> bool:
    """Whether this variant's graph appends each step to a KV buffer it is given, so one buffer per layer can
    serve every step: the fused decoder graph (manifest ``decoder.in_place_cache``, only with
    ``onnxruntime_fusions``), whose GroupQueryAttention reads ``past_key_values`` directly. Not fp16: its cache
    passes through Casts, which copy the whole buffer every step, so the plain way is no slower."""
    entry = manifest["variants"].get(variant) or {}
    return (bool((manifest.get("decoder") or {}).get("in_place_cache")) and manifest.get("onnxruntime_fusions") is True
            and entry.get("dtype") != "float16")


def session_step(session, io, run_options=None):
    """A generation.Step over ``session.run``: the inputs the graph has (a past may be a view of a buffer,
    which onnxruntime needs contiguous), every output by name; the cache comes back as new arrays."""
    inputs = [n for n in io.input_names if n in {i.name for i in session.get_inputs()}]
    names = list(io.output_names)

    def step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        plain = {n: np.ascontiguousarray(feeds[n]) for n in inputs}
        return dict(zip(names, run_session(session, names, plain, run_options)))

    return step


# What a graph that does not append in place fails with, bound this way: the manifest's claim is then wrong.
_IN_PLACE_FAILED = "onnxruntime cannot run the graph with its KV cache written in place (manifest decoder.in_place_cache)"


class KVBuffers:
    """One KV buffer per layer, bound as both ``past_key_values.*`` and ``present.*`` of an in-place graph.

    GroupQueryAttention, given the same memory for past and present, writes the new step's keys and values at
    its position and leaves the rest, instead of copying the whole cache into a new present each step (SmolLM2
    int4 at context 128: 1 ms of a 16 ms step, issue 15). The buffers hold ``capacity`` positions; only the first
    ``total`` (the attention mask's length) are read. They grow by doubling, up to ``limit`` positions (the
    model's context length) unless a step needs more. Not thread-safe: one step at a time.
    """

    def __init__(self, session, io, run_options=None, limit: int | None = None) -> None:
        self.session, self.io, self.run_options, self.limit = session, io, run_options, limit
        self.arrays: list[np.ndarray] = []
        self.values: list[Any] = []
        self.length = 0  # positions written
        self._binding: Any = None
        self._fed: list[Any] = []  # the step's input OrtValues, alive until the next step

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    @property
    def batch(self) -> int:
        return self.arrays[0].shape[0] if self.arrays else 0

    def load(self, past: list[np.ndarray], capacity: int) -> None:
        """Copy a cache (one (batch, kv_heads, length, head_dim) array per past input) into fresh buffers."""
        import onnxruntime as ort

        length = past[0].shape[2]
        if self.limit:
            capacity = min(capacity, self.limit)
        capacity = max(capacity, length + 1)
        arrays = []
        for p in past:
            buf = np.zeros((p.shape[0], p.shape[1], capacity, p.shape[3]), np.float32)
            buf[:, :, :length] = p
            arrays.append(buf)
        self.arrays = arrays
        self.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self.length = length
        self._binding = self.session.io_binding()
        for past_name, present, value in zip(self.io.past_names, self.io.present_names, self.values):
            self._binding.bind_ortvalue_input(past_name, value)
            self._binding.bind_ortvalue_output(present, value)

    def views(self, length: int) -> list[np.ndarray]:
        """The first ``length`` positions of each buffer, read-only: a later step writes after them, never in."""
        out = []
        for a in self.arrays:
            v = a[:, :, :length]
            v.flags.writeable = False
            out.append(v)
        return out

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """One step on the buffers (``feeds``: ids, mask, positions); returns the logits."""
        import onnxruntime as ort

        total = feeds["attention_mask"].shape[1]
        if total > self.capacity:  # load keeps it within the limit unless this step needs more
            self.load(self.views(self.length), max(total, 2 * self.capacity))
        binding = self._binding
        self._fed = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in feeds.values()]
        for name, value in zip(feeds, self._fed):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        try:
            self.session.run_with_iobinding(binding, self.run_options)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own InvalidArgument/Fail types
            raise BundleError(f"{_IN_PLACE_FAILED}: {str(e).splitlines()[0][:160]}") from None
        self.length = total
        return binding.get_outputs()[-1].numpy()


class InPlaceStep:
    """A generation.Step over an in-place graph: the same outputs as ``session.run``, the cache kept in
    KVBuffers and returned as read-only views of them. A step continues in the buffers only when every past it
    is given is the view this object returned last, for the same batch, one step on; anything else (a prefill,
    a rewind, a cache from elsewhere) runs plainly and its present is copied in. Not thread-safe."""

    def __init__(self, session, io, run_options=None, headroom: int = 256, limit: int | None = None) -> None:
        self.session, self.io, self.run_options, self.headroom = session, io, run_options, headroom
        self.kv = KVBuffers(session, io, run_options, limit)
        self._plain = session_step(session, io, run_options)
        self._inputs = [n for n in io.input_names if n in {i.name for i in session.get_inputs()}]
        self._last: list[np.ndarray] = []  # the presents returned last: the cache a continuing step passes back

    def _continues(self, feeds: dict[str, np.ndarray]) -> bool:
        new = feeds["input_ids"].shape
        return (bool(self._last) and all(feeds[n] is v for n, v in zip(self.io.past_names, self._last))
                and new[0] == self.kv.batch and feeds["attention_mask"].shape[1] - new[1] == self.kv.length)

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self.io
        total = feeds["attention_mask"].shape[1]
        if self._continues(feeds):
            step = {n: feeds[n] for n in self._inputs if not n.startswith("past_key_values.")}
            out = {"logits": self.kv.run(step)}
        else:
            out = self._plain(feeds)
            self.kv.load([out[n] for n in io.present_names], total + self.headroom)
        self._last = self.kv.views(total)
        out.update(zip(io.present_names, self._last))
        return out


class BundleGenerator:
    """Text generation with a decoder bundle, without torch: ``BundleGenerator(path).stream("Hello")``.

    Keeps the KV cache between steps (onnxruntime outputs present.* feed the next step's past_key_values; in
    one buffer per layer where the graph appends in place, ``InPlaceStep``). One stream at a time: not
    thread-safe.
    """

    def __init__(self, root: Path | str, variant: str | None = None, providers: list[str] | None = None,
                 threads: int | None = None, adapter: str | None = None, ort_format: bool = False) -> None:
        from .generation import DecoderIO

        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if not family_of(self.manifest).is_decoder:
            raise UserInputError(f"{self.root}: a {self.manifest['task']} bundle cannot generate text; use infer")
        variants = self.manifest["variants"]
        self.variant = variant or self.manifest.get("default_variant", "fp32")
        if self.variant not in variants:
            raise UserInputError(f"{self.root}: no variant {self.variant!r}; this bundle has {', '.join(variants)}")
        self.io = DecoderIO.from_json(self.manifest["decoder"])
        self.gen = self.manifest["generation"]
        check_members(self.root, self.manifest, self.variant)
        self.tokenizer = bundle_tokenizer(self.root, self.manifest)
        self.tokenizer.no_padding()
        self.adapter = adapter
        self._active = activate_adapter(self.root, self.manifest, adapter)
        self.session = make_session(self.root / graph_file(self.root, variants[self.variant], ort_format), providers,
                                    threads, bundle_session_config(self.manifest))
        options = self._active.run_options if self._active else None
        self._step = (InPlaceStep(self.session, self.io, options, limit=int(self.gen.get("context_length", 2048)))
                      if in_place_cache(self.manifest, self.variant) else session_step(self.session, self.io, options))

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._step(feeds)

    def apply_chat_template(self, prompt: str) -> str:
        template = self.gen.get("chat_template")
        if not template:
            raise UserInputError(f"{self.root}: the tokenizer has no chat template; drop --chat")
        return chat_prompt(template, prompt, self.gen.get("bos_token") or "", self.gen.get("eos_token") or "")

    def stream(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None, chat: bool = False):
        """Yield text pieces as they are generated; stops at EOS, a stop string or the context limit."""
        from .generation import stream as stream_ids

        text_in = self.apply_chat_template(prompt) if chat else prompt
        ids = self.tokenizer.encode(text_in, add_special_tokens=not chat).ids
        if not ids:
            raise UserInputError("the prompt is empty after tokenization")
        generated: list[int] = []
        shown = ""
        for tok in stream_ids(self.step, self.io, ids, max_new_tokens=max_new_tokens,
                              eos_ids=set(self.gen.get("eos_token_ids") or []),
                              max_length=int(self.gen.get("context_length", 2048)), temperature=temperature,
                              top_p=top_p, seed=seed):
            generated.append(tok)
            text = self.tokenizer.decode(generated)
            hit = [text.index(s) for s in stop or [] if s in text]
            if hit:
                yield text[len(shown):min(hit)]
                return
            # Hold back a trailing replacement character: a multi-byte character may be half decoded.
            if not text.endswith("\ufffd"):
                yield text[len(shown):]
                shown = text

    def generate(self, prompt: str, **kwargs: Any) -> str:
        return "".join(self.stream(prompt, **kwargs))
