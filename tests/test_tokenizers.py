"""Tokenizers as models ship them: no pad token, a vocabulary in another language, the user's own probe texts.

None of these tokenizers is built from the probe texts: the decoder one is SmolLM2's real tokenizer, the
encoder one a hand-written German word list (the English probes are mostly <unk> for it).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import assert_clean_failure, make_adapter, run_export, tiny_config

from exporter.cli import cli
from exporter.verify import verify_bundle

GERMAN = ["der", "die", "das", "und", "ist", "nicht", "ein", "eine", "zu", "mit", "von", "auf", "für", "sich", "dem", "den", "des", "im", "es", "war", "wir", "ihr", "sie", "er", "ich", "du", "aber", "auch", "noch", "nur", "schon", "sehr", "gut", "schlecht", "schön", "groß", "klein", "neu", "alt", "heute", "morgen", "gestern", "immer", "nie", "hier", "dort", "haus", "stadt", "land", "wasser", "brot", "kaffee", "zug", "bahnhof", "wetter", "regen", "sonne", "wind", "schnee", "buch", "film", "musik", "essen", "trinken", "gehen", "kommen", "sehen", "hören", "lesen", "schreiben", "sprechen", "arbeiten", "wohnen", "fahren", "kaufen", "lieben", "hassen", "finden", "glauben", "wissen", "machen", "sagen", "geben", "nehmen", "bleiben", "liegen", "stehen", "sitzen", "laufen", "freund", "freundin", "kind", "mutter", "vater", "bruder", "schwester", "arzt", "lehrer", "geld", "zeit", "jahr", "woche", "tag", "nacht", "abend", "stunde", "minute", "wunderbar", "schrecklich", "langweilig", "lustig", "freundlich", "teuer", "billig", "laut", "leise", "warm", "kalt", "schnell", "langsam", "früh", "spät", "endlich", "leider", "vielleicht", "wirklich"]
GERMAN_PROBES = ["Der Film war wirklich wunderbar.", "Das Essen war kalt und teuer, leider.",
                 "Heute ist das Wetter schön.", "Der Zug kommt immer spät."]


def _german_base(root, vocab=GERMAN):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import AutoModel, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    ids = {t: i for i, t in enumerate(specials + list(vocab))}
    tok = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    base = root / "german-base"
    AutoModel.from_config(tiny_config("bert", len(fast))).save_pretrained(base)
    fast.save_pretrained(base)
    return base


@pytest.fixture(scope="module")
def german(tmp_path_factory):
    root = tmp_path_factory.mktemp("german")
    base = _german_base(root)
    return base, make_adapter(base, "bert", "text-classification", root / "german-adapter")


def test_non_english_vocabulary_exports_with_probes_from_its_vocabulary(german, tmp_path):
    _, adapter = german
    out = tmp_path / "b"
    r = run_export(adapter, out, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passed"] and any("<unk>" in w and "--probe-texts" in w for w in report["warnings"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["probes"]["source"] == "vocabulary" and manifest["probes"]["builtin_unk_share"] > 0.5
    texts = json.loads((out / "reference" / "probes.json").read_text())["texts"]
    assert all(w in GERMAN for t in texts for w in t.split())  # made of its own words: nothing is <unk>
    assert verify_bundle(out)["passed"]
    r = CliRunner().invoke(cli, ["infer", str(out), GERMAN_PROBES[0], "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["results"][0]["label"] in ("negative", "neutral", "positive")


def test_user_probe_texts_are_stored_and_reverified(german, tmp_path):
    _, adapter = german
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("\n".join(json.dumps({"text": t}) for t in GERMAN_PROBES) + "\n", encoding="utf-8")
    out = tmp_path / "b"
    r = run_export(adapter, out, "--probe-texts", str(probe_file), "--json")
    assert r.exit_code == 0, r.output
    probes = json.loads((out / "reference" / "probes.json").read_text())
    assert probes["texts"] == GERMAN_PROBES
    assert probes["batches"][:3] == [[0], [1], [2]] and [0, 1, 2, 3] in probes["batches"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["probes"] == {"source": "user", "count": 4, "builtin_unk_share": manifest["probes"]["builtin_unk_share"]}
    assert manifest["spec"]["probe_texts"] == "probes.jsonl"  # the file name, never its path
    assert verify_bundle(out)["passed"]
    # Plain text, one per line, works the same; more texts than the limit are cut with a warning.
    plain = tmp_path / "probes.txt"
    plain.write_text("\n".join(GERMAN_PROBES * 20), encoding="utf-8")
    r = run_export(adapter, tmp_path / "c", "--probe-texts", str(plain), "--quantize", "none", "--json")
    assert r.exit_code == 0, r.output
    assert any("first 64 of 80" in w for w in json.loads(r.stdout)["warnings"])


def test_bad_probe_files_are_one_line_errors(german, tmp_path):
    _, adapter = german
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "gut"}\n{"txt": "schlecht"}\n', encoding="utf-8")
    out = tmp_path / "b"
    assert_clean_failure(run_export(adapter, out, "--probe-texts", str(bad)), out, "bad.jsonl:2", '"text"')
    assert_clean_failure(run_export(adapter, out, "--probe-texts", str(tmp_path / "none.txt")), out, "not found")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert_clean_failure(run_export(adapter, out, "--probe-texts", str(empty)), out, "holds no text")


def test_a_tiny_vocabulary_is_still_refused(tmp_path):
    base = _german_base(tmp_path, vocab=["gut", "schlecht", "und"])
    adapter = make_adapter(base, "bert", "text-classification", tmp_path / "adapter")
    out = tmp_path / "b"
    assert_clean_failure(run_export(adapter, out), out, "only 8 tokens", "empty or broken")


@pytest.fixture(scope="module")
def slim_smol(tmp_path_factory):
    """SmolLM2 cut to its first 2 layers (the real embeddings, tokenizer and chat template) as a local base."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from exporter.loading import resolve_base_name

    loc = resolve_base_name("embedded:SmolLM2-135M-Instruct").location
    config = AutoConfig.from_pretrained(loc)
    config.num_hidden_layers = 2
    slim = LlamaForCausalLM(config)
    full = AutoModelForCausalLM.from_pretrained(loc).state_dict()
    slim.load_state_dict({k: v for k, v in full.items() if k in slim.state_dict()})
    root = tmp_path_factory.mktemp("slim")
    slim.save_pretrained(root / "base")
    AutoTokenizer.from_pretrained(loc).save_pretrained(root / "base")
    torch.manual_seed(0)
    return root / "base"


def test_decoder_tokenizer_without_pad_token_pads_left_with_eos(slim_smol, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(slim_smol),
                        LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                   target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    # The adapter ships the tokenizer as GPT-2, Llama and Mistral ship theirs: without a pad token.
    tok = AutoTokenizer.from_pretrained(slim_smol)
    tok.pad_token = None
    tok.save_pretrained(adapter)
    assert json.loads((adapter / "tokenizer_config.json").read_text()).get("pad_token") is None
    out = tmp_path / "b"
    r = run_export(adapter, out, "--base", str(slim_smol), "--quantize", "int8", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    t = manifest["tokenizer"]
    assert t["pad_source"] == "eos" and t["pad_token"] == tok.eos_token and t["pad_id"] == tok.eos_token_id
    assert t["padding_side"] == "left"
    # The left-padded probe batch (padded with EOS) reproduced each prompt alone, on every variant.
    report = verify_bundle(out)
    assert report["passed"], report["variants"]
    assert json.loads(r.stdout)["variants"]["fp32"]["outputs"]["logits"]["greedy_exact"] == 1.0
