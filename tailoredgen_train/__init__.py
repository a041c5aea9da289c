"""tailoredgen-train: LoRA fine-tuning of Bria's text-to-image models behind the Start Training contract."""

import logging

__version__ = "0.1.0"


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back
    to `CLIPImageProcessorPil`" warning. Importing a diffusers pipeline (what every family module and
    every command does) imports the CLIP and SigLIP image processors that pipelines use for
    IP-adapters; the engine never uses them, so the warning tells our users nothing. Only this one
    message of this one logger is dropped; it is installed here, before any module of this package
    can import diffusers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())
