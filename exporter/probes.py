"""Deterministic probe inputs, tokenized with the `tokenizers` library only.

The same code runs at export time (to make the PyTorch reference) and on the device (``verify``
re-tokenizes the stored texts and must reproduce the stored ids), so it must not import torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, FileSystemError, TamperedBundleError
from .tasks import FAMILIES

# Short, medium and long texts; the long one is truncated at max_length. Batches mix lengths so padding
# is exercised, and batch 1 runs each of a few texts alone (no padding at all).
PROBE_TEXTS: tuple[str, ...] = (
    "Great.",
    "The battery died after two days and support never answered my emails.",
    "I was not expecting much, but the food was wonderful and the staff were kind.",
    "Terrible.",
    "Paris is the capital of France, and Marie Curie worked at the University of Paris.",
    "An absolutely delightful film: sharp writing, lovely music, and a cast that clearly enjoyed every scene.",
    "ok",
    (
        "We stayed for a week in late October. The room was clean and quiet, the breakfast had plenty of "
        "choice, and the location made it easy to walk to the old town, the harbour and the museums. The "
        "only downside was the slow lift, which sometimes took minutes to arrive, and the wifi that dropped "
        "every evening around nine. Still, the staff went out of their way to help us book tours, recommended "
        "restaurants that were not in any guide book, and even kept our bags after check-out. We would come "
        "back without hesitation and have already recommended it to friends and family."
    ),
)
PROBE_BATCHES: tuple[tuple[int, ...], ...] = ((0,), (1,), (7,), (0, 1, 2, 3), (4, 5, 6, 7, 2, 3, 0, 1))
DEFAULT_MAX_LENGTH = 128

# Decoder probes: prompts of different lengths, run alone and as one left-padded batch. Export keeps the
# ones whose greedy top-2 margins are clearest (random test models have near-ties) and stores the margins.
PROBE_PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Write a short note to the team about the release:",
    "Q: What is 12 times 7?\nA:",
    "Once upon a time",
    "Translate to French: good morning",
    "The three most important things about edge deployment are",
    "def fibonacci(n):",
    "Summarise: the battery lasted two days and the screen was bright.",
)
GREEDY_TOKENS = 8


# A probe set is judged on text the tokenizer can encode: when more than this share of the built-in English
# probes' tokens are <unk> (a domain or non-English vocabulary), probes are made from the vocabulary instead.
MAX_UNK_SHARE = 0.5
# A vocabulary with fewer entries than this is broken (transformers 5 builds an empty one when a base ships
# no tokenizer files), whatever its language.
MIN_VOCAB = 16


@dataclass(frozen=True)
class ProbeTexts:
    """The texts (encoders) or prompts (decoders) parity runs on, and where they came from."""

    texts: tuple[str, ...]
    source: str  # "builtin", "user" (export --probe-texts) or "vocabulary" (made from the tokenizer's tokens)
    unk_share: float  # share of <unk> tokens in the built-in probes (0 when the tokenizer has no <unk>)

    def manifest(self) -> dict:
        return {"source": self.source, "count": len(self.texts), "builtin_unk_share": round(self.unk_share, 4)}


def select_probe_texts(tok, family: str, user: tuple[str, ...] | None, warnings: list[str]) -> ProbeTexts:
    """The user's texts, else the built-in ones when the tokenizer can encode them, else vocabulary texts.

    ``tok`` is the bundle's tokenizers.Tokenizer; ``family`` is "encoder" or "decoder" (texts or prompts).
    """
    from .errors import UserInputError

    defaults = PROBE_PROMPTS if FAMILIES[family].is_decoder else PROBE_TEXTS
    share = unk_share(tok, defaults)
    if user is not None:
        return ProbeTexts(tuple(user), "user", share)
    if share <= MAX_UNK_SHARE:
        return ProbeTexts(defaults, "builtin", share)
    made = vocabulary_texts(tok, tuple(len(t.split()) for t in defaults))
    if unk_share(tok, made) > MAX_UNK_SHARE:
        raise UserInputError("the tokenizer maps even text made of its own tokens to <unk>, so it is broken; use the "
                             "model's own tokenizer files")
    warnings.append(f"the tokenizer maps {share:.0%} of the built-in English probes to <unk> (another language or a "
                    "domain vocabulary): parity ran on texts made from its own vocabulary; pass --probe-texts FILE "
                    "with in-domain text for a check on real inputs")
    return ProbeTexts(made, "vocabulary", share)


def unk_share(tok, texts: tuple[str, ...] | list[str]) -> float:
    """Share of a tokenizers.Tokenizer's ids that are <unk> over these texts (0.0 without an unk token)."""
    unk = _unk_id(tok)
    if unk is None:
        return 0.0
    # Padding positions (the bundle's tokenizer pads batches) are not text.
    ids = [i for e in tok.encode_batch(list(texts), add_special_tokens=False)
           for i, keep in zip(e.ids, e.attention_mask) if keep]
    return ids.count(unk) / max(len(ids), 1)


def _unk_id(tok) -> int | None:
    import json

    model = json.loads(tok.to_str()).get("model", {})
    unk = model.get("unk_token")
    if unk is None and model.get("unk_id") is not None:  # Unigram stores the id
        return int(model["unk_id"])
    return tok.token_to_id(unk) if isinstance(unk, str) else None


def vocabulary_texts(tok, lengths: tuple[int, ...], seed: int = 0) -> tuple[str, ...]:
    """Deterministic texts made of the tokenizer's own (non-special) tokens, one per requested length."""
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    vocab = sorted((i, t) for t, i in tok.get_vocab().items() if t not in specials)
    usable = [i for i, t in vocab if not t.startswith(("[", "<")) and t.strip("#▁Ġ ")] or [i for i, _ in vocab]
    rng = np.random.default_rng(seed)
    texts = []
    for n in lengths:
        text = tok.decode([int(i) for i in rng.choice(usable, size=max(n, 1))]).strip()
        texts.append(text or tok.decode([usable[0]]))
    return tuple(texts)


def parse_probe_file(raw: str, where: str, limit: int) -> tuple[tuple[str, ...], int]:
    """``export --probe-texts FILE``: one text per line, or JSON Lines of strings or {"text"|"prompt": ...}.

    Returns the texts (at most ``limit``) and how many the file held.
    """
    import json

    from .errors import UserInputError

    lines = [(n, line) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    is_jsonl = bool(lines) and all(line.lstrip().startswith(("{", '"')) for _, line in lines)
    texts = []
    for n, line in lines:
        if not is_jsonl:
            texts.append(line)
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise UserInputError(f"{where}:{n}: not valid JSON (the file looks like JSON Lines)") from None
        text = item if isinstance(item, str) else (item.get("text", item.get("prompt"))
                                                    if isinstance(item, dict) else None)
        if not isinstance(text, str) or not text.strip():
            raise UserInputError(f"{where}:{n}: expected a string or an object with a \"text\" or \"prompt\" string")
        texts.append(text)
    if not texts:
        raise UserInputError(f"{where}: the probe file holds no text; give one text per line")
    return tuple(texts[:limit]), len(texts)


def user_batches(n: int) -> tuple[tuple[int, ...], ...]:
    """Batches over n user texts: the first three alone (no padding), then all of them in batches of 8."""
    singles = tuple((i,) for i in range(min(n, 3)))
    return singles + tuple(tuple(range(i, min(i + 8, n))) for i in range(0, n, 8))


@dataclass(frozen=True)
class ProbeSet:
    texts: tuple[str, ...]
    batches: tuple[tuple[int, ...], ...]
    max_length: int
    input_names: tuple[str, ...]
    # One dict per batch: input name -> int64 array (batch, sequence)
    feeds: tuple[dict[str, np.ndarray], ...]

    def to_json(self) -> dict:
        return {"texts": list(self.texts) or None, "batches": [list(b) for b in self.batches],
                "max_length": self.max_length}


def load_tokenizer(path: Path, max_length: int, pad_id: int, pad_token: str, padding_side: str = "right"):
    """The bundle's tokenizer.json with our truncation and padding (left for decoders, as generate() pads)."""
    from tokenizers import Tokenizer

    if path.exists() and not os.access(path, os.R_OK):
        raise FileSystemError(f"{path}: cannot read it (permission denied); check its permissions")
    try:
        tok = Tokenizer.from_file(str(path))
        tok.enable_truncation(max_length=max_length, direction="left" if padding_side == "left" else "right")
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token, direction=padding_side)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - tokenizers raises bare Exceptions, and a Rust panic (a
        # BaseException) on a bad regex or absurd settings
        raise BundleError(f"{path}: cannot load tokenizer ({str(e)[:100]}); re-export the bundle") from None
    return tok


def encode(tok, texts: list[str] | tuple[str, ...], input_names: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        encs = tok.encode_batch(list(texts))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - a Rust panic in a tokenizer file's regex is a BaseException
        raise BundleError(f"the tokenizer failed on this input ({str(e)[:100]}); its tokenizer.json is broken") from None
    feeds = {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }
    return {name: feeds[name] for name in input_names}


def build_probes(
    tok,
    input_names: tuple[str, ...],
    max_length: int,
    texts: tuple[str, ...] = PROBE_TEXTS,
    batches: tuple[tuple[int, ...], ...] = PROBE_BATCHES,
) -> ProbeSet:
    feeds = tuple(encode(tok, [texts[i] for i in b], input_names) for b in batches)
    return ProbeSet(tuple(texts), tuple(tuple(b) for b in batches), max_length, input_names, feeds)


def save_arrays(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    arrays = {f"{i}.{name}": a for i, b in enumerate(batches) for name, a in b.items()}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _check_npz(path: Path) -> None:
    """Every member's header must claim no more bytes than the member holds: a header claiming 2^40 elements
    would otherwise make numpy allocate them (MemoryError) before noticing the data is short."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            # numpy.savez stores members uncompressed; a compressed member could inflate far past the file.
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise ValueError(f"{info.filename}: compressed member (numpy.savez writes them stored)")
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                reader = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if reader is None:
                    raise ValueError(f"{info.filename}: .npy format {version} is not one numpy.savez writes here")
                shape, _, dtype = reader(f)
            if dtype.hasobject:
                raise ValueError(f"{info.filename}: object arrays are not reference data")
            if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
                raise ValueError(f"{info.filename}: its header claims {shape} but the file is {info.file_size} bytes")


def load_arrays(path: Path, n_batches: int) -> list[dict[str, np.ndarray]]:
    import zipfile

    try:
        _check_npz(path)
        with np.load(path, allow_pickle=False) as z:
            out: list[dict[str, np.ndarray]] = [{} for _ in range(n_batches)]
            for key in z.files:
                i, name = key.split(".", 1)
                out[int(i)][name] = z[key]
    except (OSError, ValueError, KeyError, IndexError, EOFError, MemoryError, NotImplementedError,
            zipfile.BadZipFile) as e:  # NotImplementedError: a zip feature (version, encryption) it lacks
        raise TamperedBundleError(f"{path}: cannot read reference arrays ({str(e)[:120]}); the bundle is damaged, "
                                  "re-export it") from None
    return out


def synthetic_probes(input_names: tuple[str, ...], max_length: int, vocab_size: int, pad_id: int) -> ProbeSet:
    """Probes for a base without a tokenizer: seeded random token ids with the text probes' lengths and padding."""
    rng = np.random.default_rng(0)
    lengths = [min(max_length, n) for n in (3, 14, max_length, 2, 17, 21, 3, max_length)]
    feeds = []
    for batch in PROBE_BATCHES:
        width = max(lengths[i] for i in batch)
        ids = np.full((len(batch), width), pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, i in enumerate(batch):
            ids[row, :lengths[i]] = rng.integers(min(100, vocab_size - 1), vocab_size, lengths[i])
            mask[row, :lengths[i]] = 1
        all_feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        feeds.append({n: all_feeds[n] for n in input_names})
    return ProbeSet((), PROBE_BATCHES, max_length, input_names, tuple(feeds))
