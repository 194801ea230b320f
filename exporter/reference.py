"""A bundle's stored reference (device side): probes.json, the probe inputs and PyTorch's outputs, each checked
against what the manifest and the probes say it must be before verify uses it. Everything here is untrusted:
a bundle is written by a stranger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import INPUTS_NPZ, OUTPUTS_NPZ, PROBES_JSON, member_problem
from .errors import TamperedBundleError
from .probes import load_arrays
from .runtime import output_infos, text_input_names
from .tasks import family_of


def probes_problem(probes: Any, decoder: bool = False, tokenizer: bool = False) -> str | None:
    """Why probes.json cannot be the probes of a bundle (it is untrusted), or None. A decoder's probes say how
    many tokens the reference generated; a bundle with a tokenizer has probe texts."""
    if not isinstance(probes, dict) or not isinstance(probes.get("batches"), list) or not probes["batches"]:
        return "no list of batches"
    texts = probes.get("texts")
    if tokenizer and texts is None:
        return "no texts (the bundle has a tokenizer)"
    if texts is not None and not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
        return "texts is not a list of strings"
    for b in probes["batches"]:
        if not isinstance(b, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in b):
            return "a batch is not a list of text indices"
        if texts is not None and any(not 0 <= i < len(texts) for i in b):
            return "a batch names a text that does not exist"
    if decoder and "max_new_tokens" not in probes:
        return "no max_new_tokens"
    new = probes.get("max_new_tokens", 0)
    if not isinstance(new, int) or isinstance(new, bool) or not 0 <= new <= 4096:
        return "max_new_tokens out of range"
    return None


def load_reference(root: Path, manifest: dict[str, Any]
                   ) -> tuple[dict, list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """probes.json with the stored inputs and PyTorch outputs, each array checked against what the manifest and
    the probes say it must be (a tampered array would otherwise reach numpy as a KeyError or a broadcast)."""
    for rel in (PROBES_JSON, INPUTS_NPZ, OUTPUTS_NPZ):
        problem = member_problem(root, rel)  # never through a symlink out of the bundle
        if problem:
            raise TamperedBundleError(f"{root}: {problem}; the bundle is damaged or tampered with")
    try:
        probes = json.loads((root / PROBES_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or not UTF-8
        raise TamperedBundleError(f"{root / PROBES_JSON}: cannot read probes ({str(e)[:80]}); re-export the "
                                  "bundle") from None
    problem = probes_problem(probes, family_of(manifest).is_decoder,
                             bool((manifest.get("tokenizer") or {}).get("file")))
    if problem:
        raise TamperedBundleError(f"{root / PROBES_JSON}: {problem}; the bundle is damaged or tampered with")
    n = len(probes["batches"])
    inputs, outputs = load_arrays(root / INPUTS_NPZ, n), load_arrays(root / OUTPUTS_NPZ, n)
    check_arrays(root / INPUTS_NPZ, inputs, expected_inputs(manifest, probes, inputs))
    check_arrays(root / OUTPUTS_NPZ, outputs, expected_outputs(manifest, probes, inputs))
    return probes, inputs, outputs


# name -> (allowed dtype kinds, shape with None where any size will do, as long as every batch agrees)
Expected = list[dict[str, tuple[str, tuple[int | None, ...]]]]


def expected_inputs(manifest: dict[str, Any], probes: dict, inputs: list[dict[str, np.ndarray]]) -> Expected:
    """Token ids and masks per batch: [rows of the batch, the batch's sequence length] (from its input_ids)."""
    out: Expected = []
    for b, feeds in zip(probes["batches"], inputs):
        ids = feeds.get("input_ids")
        seq = ids.shape[1] if ids is not None and ids.ndim == 2 else -1
        out.append({name: ("iu", (len(b), seq)) for name in text_input_names(manifest)})
    return out


def expected_outputs(manifest: dict[str, Any], probes: dict, inputs: list[dict[str, np.ndarray]],
                     required: tuple[str, ...] | None = None) -> Expected:
    """The arrays outputs.npz holds per batch (``required``: only these names, as in base_outputs.npz)."""
    out: Expected = []
    for b, feeds in zip(probes["batches"], inputs):
        n, seq = len(b), feeds["input_ids"].shape[1]
        if family_of(manifest).is_decoder:
            k = int(probes["max_new_tokens"])
            want = {"logits": ("f", (n, seq, None)), "tokens": ("iu", (n, k)), "margins": ("f", (n, k))}
        else:
            want = {i.name: ("f", (n, seq, None) if i.per_token else (n, None)) for i in output_infos(manifest)}
        out.append({k: v for k, v in want.items() if required is None or k in required})
    return out


# Token ids, token types and generated tokens are indices into tables far smaller than this.
MAX_TOKEN_ID = 2**31 - 1


def check_arrays(path: Path, arrays: list[dict[str, np.ndarray]], expected: Expected, optional: bool = False) -> None:
    """Every expected array present (unless ``optional``) with its dtype kind and shape, finite; free sizes equal
    across batches."""
    free: dict[tuple[str, int], int] = {}
    for i, (got, want) in enumerate(zip(arrays, expected)):
        for name, (kinds, shape) in want.items():
            a = got.get(name)
            problem = None
            if a is None:
                if optional:
                    continue
                problem = "missing"
            elif a.dtype.kind not in kinds or a.ndim != len(shape):
                problem = f"is {a.dtype} with {a.ndim} axes"
            elif a.dtype.kind == "f" and not np.isfinite(a).all():
                problem = "holds NaN or inf"
            elif a.dtype.kind in "iu" and a.size and (a.min() < 0 or a.max() > MAX_TOKEN_ID):
                problem = f"holds values outside 0..{MAX_TOKEN_ID}"
            elif name == "attention_mask" and not np.isin(a, (0, 1)).all():
                problem = "holds values other than 0 and 1"
            else:
                for axis, (size, need) in enumerate(zip(a.shape, shape)):
                    need = need if need is not None else free.setdefault((name, axis), size)
                    if size != need:
                        problem = f"has shape {list(a.shape)} where axis {axis} must be {need}"
                        break
            if problem:
                raise TamperedBundleError(f"{path}: batch {i} {name} {problem}; the bundle is damaged or tampered "
                                          "with")
