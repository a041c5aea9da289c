"""tailoredgen-train: LoRA fine-tuning of Bria's text-to-image models behind the Start Training contract."""

__version__ = "0.1.0"
