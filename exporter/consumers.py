"""What other runtimes need to load a bundle as it is, written in one place from the bundle's own files and
manifest (build side): a tokenizer_config.json that transformers 4.57 and 5.x, optimum and transformers.js all
read the same way, and onnxruntime-genai's genai_config.json for decoders. The graphs already sit where
transformers.js looks for them (formats.VARIANT_FILES) and name their batch axis as it expects
(onnx_export.BATCH_AXIS). docs/consumers.md shows the code for each consumer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bundle import write_json
from .runtime import in_place_cache
from .tasks import family_of

TOKENIZER_CONFIG = "tokenizer_config.json"
GENAI_CONFIG = "genai_config.json"

# transformers 5 saves tokenizers under this class, which transformers 4.x cannot import; the class both load
# (with identical ids, measured on MiniLM and SmolLM2) is the generic fast tokenizer over tokenizer.json.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
# Keys transformers 5 writes from how the tokenizer was *loaded* (a local folder, offline), not what it is.
LOAD_TIME_KEYS = ("is_local", "local_files_only", "_commit_hash", "name_or_path")


def write_consumer_files(staging: Path, manifest: dict[str, Any]) -> None:
    tokenizer = manifest.get("tokenizer")
    if tokenizer and (staging / TOKENIZER_CONFIG).is_file():
        write_json(staging / TOKENIZER_CONFIG, portable_tokenizer_config(staging, manifest))
    if family_of(manifest).is_decoder:
        write_json(staging / GENAI_CONFIG, genai_config(staging, manifest))


def _special_ids(staging: Path, manifest: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the bundle's tokenizer.json puts BOS first / EOS last on a text (what the reference used)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(staging / manifest["tokenizer"]["file"]))
    gen = manifest.get("generation") or {}
    ids = tok.encode("Hello").ids
    bos = tok.token_to_id(gen["bos_token"]) if gen.get("bos_token") else None
    eos = tok.token_to_id(gen["eos_token"]) if gen.get("eos_token") else None
    return bool(ids) and bos is not None and ids[0] == bos, bool(ids) and eos is not None and ids[-1] == eos


def portable_tokenizer_config(staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    config = json.loads((staging / TOKENIZER_CONFIG).read_text(encoding="utf-8"))
    for key in LOAD_TIME_KEYS:
        config.pop(key, None)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    family = family_of(manifest)
    # The generic class returns token_type_ids unless told; a decoder's forward (optimum's generate) refuses them.
    config["model_input_names"] = [i["name"] for i in manifest["inputs"] if not i["name"].startswith("past")
                                   and i["name"] != "position_ids"]
    # What the bundle's own readers truncate at: an encoder's probes and infer, a decoder's context.
    config["model_max_length"] = (manifest["generation"]["context_length"] if family.is_decoder
                                  else manifest["tokenizer"]["max_length"])
    config["padding_side"] = family.padding_side
    if family.is_decoder:
        # Consumers that build the post-processor from these flags (transformers.js, LlamaTokenizerFast)
        # would otherwise add or drop BOS unlike the reference.
        config["add_bos_token"], config["add_eos_token"] = _special_ids(staging, manifest)
    return config


def genai_config(staging: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """onnxruntime-genai's description of the default variant's graph. Where its GroupQueryAttention appends
    to the cache in place (runtime.in_place_cache), genai shares the past and present buffers, as its own
    builder's graphs do; a traced graph concatenates (present = past + new), so they are not shared."""
    config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    dec, gen, tok = manifest["decoder"], manifest["generation"], manifest["tokenizer"]
    names = {i["name"] for i in manifest["inputs"]}
    eos = gen["eos_token_ids"]
    return {
        "model": {
            "type": manifest["base"]["model_type"],
            "bos_token_id": config.get("bos_token_id"),
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": tok["pad_id"],
            "vocab_size": config["vocab_size"],
            "context_length": gen["context_length"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": manifest["variants"][manifest["default_variant"]]["file"],
                "head_size": dec["head_dim"],
                "hidden_size": config.get("hidden_size") or config.get("n_embd"),
                "num_attention_heads": config.get("num_attention_heads") or config.get("n_head"),
                "num_hidden_layers": dec["num_layers"],
                "num_key_value_heads": dec["num_kv_heads"],
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           **({"position_ids": "position_ids"} if "position_ids" in names else {}),
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "num_beams": 1, "max_length": gen["context_length"], "min_length": 0,
                   "past_present_share_buffer": in_place_cache(manifest, manifest["default_variant"]),
                   "repetition_penalty": 1.0, "temperature": 1.0,
                   "top_k": 1, "top_p": 1.0},
    }
