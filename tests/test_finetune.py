"""Fine-tuning on tiny models: each task type, resume, 2-process DDP, and `run` end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import make_causal_base, write_recipe
from safetensors.torch import load_file

from exporter.cli import cli
from exporter.finetune import METRICS_FILE, encode_rows, finetune
from exporter.recipes import load_recipe


@pytest.mark.parametrize("task,peft_type,metric", [
    ("text-classification", "SEQ_CLS", "accuracy"),
    ("token-classification", "TOKEN_CLS", "entity_f1"),
])
def test_few_step_finetune_writes_a_complete_adapter(factory, tmp_path, task, peft_type, metric):
    recipe = load_recipe(write_recipe(tmp_path / "r", factory.base("bert"), task))
    out = tmp_path / "adapter"
    result = finetune(recipe, out, quiet=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == peft_type and cfg["r"] == 4
    assert cfg["base_model_name_or_path"] == "local:base-bert"  # no machine path in the adapter
    tensors = load_file(out / "adapter_model.safetensors")
    assert any("classifier" in k for k in tensors), "the head must be saved with the adapter"
    meta = json.loads((out / "export_adapter.json").read_text())
    assert meta["labels"] == result.metrics["labels"] and len(meta["labels"]) >= 2
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["global_step"] == 4 and 0.0 <= metrics["eval"][metric] <= 1.0
    assert not (tmp_path / ".adapter.work").exists()  # checkpoints cleaned after success
    # The adapter exports as it is, labels included.
    r = CliRunner().invoke(cli, ["export", "--adapter", str(out), "--base", str(factory.base("bert")),
                                 "-o", str(tmp_path / "bundle"), "-q", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["labels"] == meta["labels"]


def test_causal_lm_sft_masks_the_prompt(tmp_path):
    from transformers import AutoTokenizer

    base = make_causal_base(tmp_path / "llama")
    recipe = load_recipe(write_recipe(tmp_path / "r", base, "text-generation", n_train=24, n_eval=8))
    tok = AutoTokenizer.from_pretrained(base)
    rows = [{"prompt": "Convert 3 km to metres.", "response": "3000 metres."}]
    ex = encode_rows(recipe, rows, tok, None)[0]
    n_prompt = len(tok("Convert 3 km to metres.\n")["input_ids"])
    assert ex["labels"][:n_prompt] == [-100] * n_prompt
    assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:] and ex["labels"][-1] == tok.eos_token_id
    out = tmp_path / "adapter"
    result = finetune(recipe, out, quiet=True)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert result.metrics["eval"]["perplexity"] > 1.0


class _StopAt:
    """A Trainer callback that interrupts training like Ctrl-C after a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __getattr__(self, name):
        def hook(args, state, control, **kwargs):
            if name == "on_save" and state.global_step >= self.step:
                raise KeyboardInterrupt
            return control
        return hook


def test_interrupted_finetune_resumes_from_checkpoint(factory, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r", factory.base("bert"), "text-classification", max_steps=4,
                                      eval_steps=1))
    out = tmp_path / "adapter"
    with pytest.raises(KeyboardInterrupt):
        finetune(recipe, out, quiet=True, callbacks=[_StopAt(2)])
    work = tmp_path / ".adapter.work"
    assert not out.exists() and (work / "checkpoint-2").is_dir()
    result = finetune(recipe, out, quiet=True, resume=True)
    assert result.metrics["resumed_from"] == "checkpoint-2"
    assert result.metrics["global_step"] == 4
    assert (out / "adapter_model.safetensors").exists() and not work.exists()


def test_resume_without_checkpoint_is_a_clear_error(factory, tmp_path):
    r = CliRunner().invoke(cli, ["finetune", str(write_recipe(tmp_path / "r", factory.base("bert"),
                                                              "text-classification")),
                                 "-o", str(tmp_path / "a"), "--resume", "-q"])
    assert r.exit_code == 1 and "no checkpoint" in r.stderr


def test_two_process_ddp_keeps_ranks_in_sync(factory, tmp_path):
    """torchrun with 2 CPU processes (gloo): different shards, all-reduced gradients, identical adapters."""
    recipe = write_recipe(tmp_path / "r", factory.base("bert"), "text-classification", max_steps=3, batch_size=4)
    out = tmp_path / "adapter"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with socket.socket() as s:  # a free port: a fixed one collides with a concurrent or leftover run
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "exporter.cli", "finetune", str(recipe), "-o", str(out), "--json", "-q"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / METRICS_FILE).read_text())
    assert metrics["world_size"] == 2
    digests = metrics["adapter_sha256_per_rank"]
    assert len(digests) == 2 and digests[0] == digests[1], "ranks diverged: gradients were not synchronised"
    assert metrics["global_step"] == 3
    load_file(out / "adapter_model.safetensors")  # one loadable adapter
    assert json.loads(proc.stdout)["world_size"] == 2  # only rank 0 printed


def test_run_end_to_end_on_tiny_model(factory, tmp_path):
    recipe = write_recipe(tmp_path / "r", factory.base("bert"), "text-classification", max_steps=6)
    spec = json.loads(recipe.read_text())
    spec["export"]["session_config"] = {"session.set_denormal_as_zero": "1"}
    recipe.write_text(json.dumps(spec))
    out = tmp_path / "bundle"
    r = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out), "--json", "-q"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    tm = report["task_metrics"]
    assert tm["metric"] == "accuracy" and tm["n_examples"] == 16
    assert set(tm["variants"]) == {"fp32", "int8"}
    assert abs(tm["variants"]["fp32"]["value"] - tm["torch"]) < 1e-9  # fp32 predicts exactly like PyTorch
    assert report["training"]["global_step"] == 6
    assert (out / "recipe.yaml").exists() and (out / "adapter" / "adapter_model.safetensors").exists()
    assert "train.jsonl" in (out / "recipe.yaml").read_text() and str(tmp_path) not in (out / "recipe.yaml").read_text()
    assert json.loads((out / "parity.json").read_text()) == report
    # The recipe's session options reach the bundle (and the sessions verify makes below).
    assert json.loads((out / "manifest.json").read_text())["session"] == {"config": {"session.set_denormal_as_zero": "1"}}
    # The eval data itself never enters the bundle.
    first_eval = json.loads((tmp_path / "r" / "eval.jsonl").read_text().splitlines()[0])["text"]
    for f in out.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".md", ".yaml"):
            assert first_eval not in f.read_text(), f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]
    r = CliRunner().invoke(cli, ["verify", str(out)])
    assert r.exit_code == 0, r.output


def test_select_best_keeps_the_best_validation_checkpoint(factory, tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r", factory.base("bert"), "text-classification", max_steps=6,
                                      eval_steps=2, select_best=True, validation_fraction=0.25))
    result = finetune(recipe, tmp_path / "adapter", quiet=True)
    m = result.metrics
    assert (m["train_rows"], m["validation_rows"], m["eval_rows"]) == (36, 12, 16)
    # Periodic evaluations ran on the validation rows (logged as eval_validation_*).
    periodic = [h for h in m["log_history"] if "eval_validation_accuracy" in h]
    assert [h["step"] for h in periodic] == [2, 4, 6]
    best = max(h["eval_validation_accuracy"] for h in periodic)
    assert m["validation"]["accuracy"] == pytest.approx(best)  # the loaded weights are the best checkpoint's
    assert m["best_checkpoint"] in {f"checkpoint-{h['step']}" for h in periodic
                                    if h["eval_validation_accuracy"] == best}
    # max_steps without eval_steps: checkpoints every max_steps/4 steps to choose from.
    m2 = finetune(load_recipe(write_recipe(tmp_path / "r2", factory.base("bert"), "text-classification",
                                           max_steps=4, select_best=True)), tmp_path / "a2", quiet=True).metrics
    assert [h["step"] for h in m2["log_history"] if "eval_validation_accuracy" in h] == [1, 2, 3, 4]
