"""Train the small sentiment LoRA adapters committed under samples/adapters/.

Plain torch + peft, CPU, about a minute each:

    python samples/train_sample_adapter.py                  # minilm-sentiment: rank 8 on query/key/value/dense
    python samples/train_sample_adapter.py --out samples/adapters/minilm-sentiment-qv-r4 --rank 4 \
        --targets query value --seed 1                     # a second fine-tune for the swappable-adapters example

Data: samples/data/sentiment/{train,eval}.jsonl, written by us for this project.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from exporter.loading import embedded_path

HERE = Path(__file__).parent
LABELS = ["negative", "positive"]
BASE = "embedded:all-MiniLM-L6-v2"


def read(path: Path) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], [LABELS.index(r["label"]) for r in rows]


def accuracy(model, tok, texts: list[str], labels: list[int]) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor(labels[i:i + 64])).sum())
    return correct / len(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE / "adapters" / "minilm-sentiment")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", nargs="+", default=["query", "key", "value", "dense"])
    args = ap.parse_args()

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    base_dir = embedded_path(BASE.removeprefix("embedded:"))
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={x: i for i, x in enumerate(LABELS)}
    )
    config = LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.05,
                        target_modules=args.targets)
    model = get_peft_model(model, config)
    train_x, train_y = read(HERE / "data/sentiment/train.jsonl")
    eval_x, eval_y = read(HERE / "data/sentiment/eval.jsonl")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    order = list(range(len(train_x)))
    steps = args.epochs * ((len(order) + 15) // 16)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / steps)
    for epoch in range(args.epochs):
        model.train()
        random.shuffle(order)
        total = 0.0
        for i in range(0, len(order), 16):
            idx = order[i:i + 16]
            enc = tok([train_x[j] for j in idx], padding=True, truncation=True, max_length=128, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([train_y[j] for j in idx])).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            total += loss.item() * len(idx)
        acc = accuracy(model, tok, eval_x, eval_y)
        print(f"epoch {epoch + 1}: train loss {total / len(order):.4f}  eval accuracy {acc:.4f}")

    model.peft_config["default"].base_model_name_or_path = BASE
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    (args.out / "export_adapter.json").write_text(
        json.dumps({"labels": LABELS, "task": "text-classification", "eval_accuracy": acc}, indent=2) + "\n"
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
