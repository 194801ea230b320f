"""export-adapter: LoRA fine-tuned Hugging Face models to verified, self-checking ONNX bundles.

The package imports nothing heavy: torch, transformers and peft load inside the stages that need them,
so the device profile (onnxruntime, tokenizers, numpy, click) can verify and run bundles.
"""

__version__ = "0.1.0"
