"""The tokenizer a bundle ships (build side): which files to copy from the adapter or the base, checks that it
belongs to the model, its chat template, end-of-sequence ids, and the probe texts it tokenizes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from .errors import UserInputError
from .probes import MIN_VOCAB
from .spec import ExportSpec
from .tasks import FAMILIES

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "spm.model")


def save_tokenizer(base, adapter, staging: Path, trust_remote_code: bool):
    """The adapter's own tokenizer when it ships one (added tokens), else the base's; saved as tokenizer.json.

    Returns the transformers tokenizer and where its pad token came from ("tokenizer" or "eos").
    """

    from .merge import adapter_vocab_size

    if any((adapter.path / f).is_file() for f in TOKENIZER_FILES):
        return load_fast_tokenizer(adapter.path, f"adapter {adapter.name}", base.config.get("vocab_size"),
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
    return load_fast_tokenizer(base.location, f"base {base.name}", base.config.get("vocab_size"),
                           adapter_vocab_size(adapter), staging, kwargs)


def load_fast_tokenizer(location, what: str, base_vocab: int | None, adapter_vocab: int | None, staging: Path,
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
    from .probes import select_probe_texts

    user = None
    if spec.probe_texts is not None:
        from .probes import parse_probe_file

        limit = FAMILIES[family].max_user_probes
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


class DecoderPrompts(NamedTuple):
    positions: int  # the model's position table, which bounds max_length
    max_length: int
    fast_tok: Any  # the bundle's tokenizer.json, truncating at max_length and padding left (as generate does)
    names: tuple[str, ...]
    prompts: Any  # ProbeTexts: the built-in or the user's prompts
    singles: list[dict[str, Any]]  # each prompt tokenized alone


def decoder_prompts(spec: ExportSpec, base, tok, staging: Path, warnings: list[str]) -> DecoderPrompts:
    """A decoder's probe prompts, tokenized by the bundle's own tokenizer.json (merged and swappable exports)."""
    from .probes import encode, load_tokenizer

    positions = base.config.get("max_position_embeddings") or base.config.get("n_positions") or spec.max_length
    max_length = min(spec.max_length, positions)
    fast_tok = load_tokenizer(staging / "tokenizer.json", max_length, tok.pad_token_id, tok.pad_token,
                              FAMILIES["decoder"].padding_side)
    names = ("input_ids", "attention_mask")
    prompts = probe_texts(spec, fast_tok, "decoder", warnings)
    return DecoderPrompts(positions, max_length, fast_tok, names, prompts,
                          [encode(fast_tok, [p], names) for p in prompts.texts])
