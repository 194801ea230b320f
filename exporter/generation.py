"""Decoder I/O and token generation with a KV cache, on numpy arrays (torch-free).

One loop serves every engine: onnxruntime on a device, and the PyTorch reference at export time (through a
step function), so the greedy continuations they produce are compared like for like.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Step = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass(frozen=True)
class DecoderIO:
    """The graph contract of an exported decoder (optimum's names)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    uses_position_ids: bool = True

    @property
    def past_names(self) -> tuple[str, ...]:
        return tuple(f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))

    @property
    def present_names(self) -> tuple[str, ...]:
        return tuple(f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value"))

    @property
    def input_names(self) -> tuple[str, ...]:
        pos = ("position_ids",) if self.uses_position_ids else ()
        return ("input_ids", "attention_mask", *pos, *self.past_names)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", *self.present_names)

    def to_json(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "uses_position_ids": self.uses_position_ids}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DecoderIO:
        return cls(int(d["num_layers"]), int(d["num_kv_heads"]), int(d["head_dim"]), bool(d["uses_position_ids"]))


def prefill_feeds(io: DecoderIO, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The first step: the whole (left-padded) prompt with an empty past."""
    batch = input_ids.shape[0]
    feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
    if io.uses_position_ids:
        # Left padding: positions count real tokens only, as transformers' generate() does.
        feeds["position_ids"] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)
    empty = np.zeros((batch, io.num_kv_heads, 0, io.head_dim), dtype=np.float32)
    for name in io.past_names:
        feeds[name] = empty
    return feeds


def next_feeds(io: DecoderIO, feeds: dict[str, np.ndarray], out: dict[str, np.ndarray],
               tokens: np.ndarray) -> dict[str, np.ndarray]:
    mask = np.concatenate([feeds["attention_mask"], np.ones((tokens.shape[0], 1), dtype=np.int64)], axis=1)
    nxt = {"input_ids": tokens[:, None].astype(np.int64), "attention_mask": mask}
    if io.uses_position_ids:
        nxt["position_ids"] = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
    for past, present in zip(io.past_names, io.present_names):
        nxt[past] = out[present]
    return nxt


@dataclass(frozen=True)
class GreedyResult:
    tokens: np.ndarray  # (batch, new tokens)
    margins: np.ndarray  # (batch, new tokens): top-1 minus top-2 logit at each step
    step_logits: np.ndarray  # (batch, new tokens, vocab): the logits each token was chosen from
    prefill_logits: np.ndarray  # (batch, prompt length, vocab)


def greedy(step: Step, io: DecoderIO, input_ids: np.ndarray, attention_mask: np.ndarray,
           max_new_tokens: int) -> GreedyResult:
    """Greedy decoding for exactly max_new_tokens (no early stop: parity compares fixed-length runs)."""
    feeds = prefill_feeds(io, input_ids, attention_mask)
    tokens, margins, logits_seen = [], [], []
    prefill = None
    for _ in range(max_new_tokens):
        out = step(feeds)
        if prefill is None:
            prefill = out["logits"]
        last = out["logits"][:, -1, :].astype(np.float64)
        top2 = np.sort(last, axis=1)[:, -2:]
        tok = last.argmax(axis=1)
        tokens.append(tok)
        margins.append(top2[:, 1] - top2[:, 0])
        logits_seen.append(last)
        feeds = next_feeds(io, feeds, out, tok)
    return GreedyResult(np.stack(tokens, 1), np.stack(margins, 1), np.stack(logits_seen, 1), prefill)


def sample_next(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """One token from the last position's logits: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest set whose mass reaches top_p
    chosen = order[keep]
    q = p[chosen] / p[chosen].sum()
    return int(rng.choice(chosen, p=q))


def stream(step: Step, io: DecoderIO, prompt_ids: list[int], *, max_new_tokens: int, eos_ids: set[int],
           max_length: int, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> Iterator[int]:
    """Yield generated token ids one by one for a single prompt, stopping at EOS or the context limit."""
    rng = np.random.default_rng(seed)
    ids = np.array([prompt_ids], dtype=np.int64)
    feeds = prefill_feeds(io, ids, np.ones_like(ids))
    length = len(prompt_ids)
    for _ in range(max_new_tokens):
        if length >= max_length:
            return
        out = step(feeds)
        tok = sample_next(out["logits"][0, -1], temperature, top_p, rng)
        if tok in eos_ids:
            return
        yield tok
        length += 1
        feeds = next_feeds(io, feeds, out, np.array([tok]))


def run_arrays(runs) -> list[dict[str, np.ndarray]]:
    """Greedy runs as the arrays a decoder reference stores: prompt logits, tokens, top-2 margins."""
    return [{"logits": r.prefill_logits.astype(np.float32), "tokens": r.tokens,
             "margins": r.margins.astype(np.float32)} for r in runs]
