"""Tiny random models built from configs (as transformers' own tests do), their tokenizer, and adapters."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    DebertaV2Config,
    DistilBertConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
    XLMRobertaConfig,
)

from exporter.probes import PROBE_TEXTS
from exporter.tasks import ARCHITECTURES

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {"text-classification": ["negative", "neutral", "positive"],
          "token-classification": ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
          "feature-extraction": None}
TASK_TYPES = {"text-classification": "SEQ_CLS", "token-classification": "TOKEN_CLS",
              "feature-extraction": "FEATURE_EXTRACTION"}
MODEL_CLASSES = {"text-classification": AutoModelForSequenceClassification,
                 "token-classification": AutoModelForTokenClassification,
                 "feature-extraction": AutoModel}


def build_vocab() -> list[str]:
    words = set()
    for text in PROBE_TEXTS:
        for w in text.lower().replace(",", " ").replace(".", " ").split():
            words.add(w.strip(":;!?"))
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    return SPECIALS + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + sorted(words - set(chars))


def tiny_tokenizer(decoder: bool = False) -> PreTrainedTokenizerFast:
    """WordPiece over the probe texts; for decoders only a BOS ([CLS]) is added, as Llama's tokenizer does."""
    vocab = {t: i for i, t in enumerate(build_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A" if decoder else "[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, pad_token_id=0)
    if arch == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                          type_vocab_size=2, **common)
    if arch == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                             max_position_embeddings=514, type_vocab_size=1, **common)
    if arch == "xlm-roberta":
        return XLMRobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=514, type_vocab_size=1, **common)
    if arch == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common)
    if arch == "deberta-v2":
        return DebertaV2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                               relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"],
                               max_relative_positions=64, type_vocab_size=0, **common)
    raise KeyError(arch)


TINY_ARCHS = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2")
assert set(TINY_ARCHS) <= set(ARCHITECTURES)


def make_base(arch: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = AutoModel.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapter(base: Path, arch: str, task: str, out: Path, r: int = 4, seed: int = 1,
                 labels: list[str] | None = None, init_lora_weights: bool = False) -> Path:
    torch.manual_seed(seed)
    labels = labels if labels is not None else LABELS[task]
    kwargs = {"num_labels": len(labels)} if labels else {}
    model = MODEL_CLASSES[task].from_pretrained(base, **kwargs)
    cfg = LoraConfig(task_type=TASK_TYPES[task], r=r, lora_alpha=2 * r,
                     target_modules=list(ARCHITECTURES[arch].default_lora_targets),
                     init_lora_weights=init_lora_weights,
                     modules_to_save=list(ARCHITECTURES[arch].seq_cls_modules)
                     if task == "text-classification" else None)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():
        # A trained head has far larger weights than the 0.02-std init; with init-size heads the logits of a
        # tiny model are ~0.05 and even a real LoRA change barely shows in them.
        for name, p in pm.named_parameters():
            if ".modules_to_save." in name:
                p.mul_(25.0)
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(out)
    if labels:
        (out / "export_adapter.json").write_text(json.dumps({"labels": labels}))
    return out


def make_causal_base(out: Path, seed: int = 0) -> Path:
    """A tiny Llama with the tiny WordPiece tokenizer (eos = [SEP]), enough to exercise SFT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer(decoder=True)
    tok.eos_token = "[SEP]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=tok.eos_token_id, bos_token_id=tok.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


SAMPLE_DATA = Path(__file__).resolve().parents[1] / "samples" / "data"


def write_recipe(d: Path, base: Path | str, task: str, n_train: int = 48, n_eval: int = 16, **training) -> Path:
    """A small recipe over the first rows of our sample data, with a tiny base."""
    import json as _json

    name, text_col, label_col = {"text-classification": ("sentiment", "text", "label"),
                                 "token-classification": ("ner", "tokens", "tags"),
                                 "text-generation": ("instructions", "prompt", "response")}[task]
    d.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("eval", n_eval)):
        lines = (SAMPLE_DATA / name / f"{split}.jsonl").read_text().splitlines()[:n]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    settings = {"max_steps": 4, "batch_size": 8, "learning_rate": 5e-3, "seed": 0, **training}
    cols = ({"prompt_column": text_col, "response_column": label_col} if task == "text-generation"
            else {"text_column": text_col, "label_column": label_col})
    recipe = {"base": str(base), "task": task, "data": {"train": "train.jsonl", "eval": "eval.jsonl", **cols},
              "lora": {"r": 4, "alpha": 8, "dropout": 0.0} | ({"target_modules": ["q_proj", "v_proj"]}
                                                               if task == "text-generation" else {}),
              "training": settings, "export": {"quantize": ["int8"]}, "tolerances": {"max_metric_drop": 0.05}}
    path = d / "recipe.yaml"
    path.write_text(_json.dumps(recipe))  # JSON is valid YAML
    return path


TINY_DECODERS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gpt2")


def tiny_decoder_config(arch: str, vocab_size: int, eos: int, bos: int):
    from transformers import (
        GemmaConfig,
        GPT2Config,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    ids = dict(vocab_size=vocab_size, eos_token_id=eos, bos_token_id=bos, pad_token_id=0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, **ids)
    return {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(head_dim=16, **common),
        "phi3": lambda: Phi3Config(**common),
        "gemma": lambda: GemmaConfig(head_dim=16, **common),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **ids),
    }[arch]()


def make_decoder_base(arch: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer(decoder=True)
    tok.eos_token = "[SEP]"
    tok.bos_token = "[CLS]"
    cfg = tiny_decoder_config(arch, len(tok), tok.eos_token_id, tok.bos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_decoder_adapter(base: Path, arch: str, out: Path, r: int = 4, seed: int = 1) -> Path:
    from transformers import AutoModelForCausalLM

    from exporter.tasks import DECODER_ARCHITECTURES

    torch.manual_seed(seed)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                        LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, init_lora_weights=False,
                                   target_modules=list(DECODER_ARCHITECTURES[arch].default_lora_targets)))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(out)
    return out


def run_export(adapter, out, *extra):
    """`export-adapter export ... -q` through CliRunner."""
    from click.testing import CliRunner

    from exporter.cli import cli

    return CliRunner().invoke(cli, ["export", "--adapter", str(adapter), "-o", str(out), "-q", *extra])


def assert_clean_failure(r, out, *needles, code=1):
    """One `error:` line naming the problem, the exit code, no traceback, OUT untouched, no staging left."""
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    msg = r.stderr.strip()
    assert msg.startswith("error: ") and len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
