"""The classic peft example, on the local all-MiniLM-L6-v2 (no hub access needed).

    python samples/peft_classic.py

LoraConfig(r=8, lora_alpha=32, target query/value) -> get_peft_model -> forward -> print logits.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from exporter.loading import embedded_path


def main() -> None:
    base = embedded_path("all-MiniLM-L6-v2")  # what `--base embedded:all-MiniLM-L6-v2` resolves to
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=32, lora_dropout=0.1,
                        target_modules=["query", "value"])
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    batch = tokenizer(["The delivery was fast and the packaging was perfect.", "It broke after a day."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        print(model(**batch).logits)


if __name__ == "__main__":
    main()
