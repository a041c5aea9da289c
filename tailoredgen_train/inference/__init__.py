"""Inference: one `generate` behind validation samples, the `generate` command and the service.

- `generate.py`  GenerationSettings, size_for, generate (one seeded pipeline call per image)
- `pipelines.py` LoraPipeline: a base's pipeline kept warm, serving many LoRA checkpoints
- `render.py`    TrainingRenderer: samples from the denoiser being trained, training left untouched
- `samples.py`   write_samples / sample_grid: PNGs, a captioned grid, prompts.json
- `sources.py`   find_lora: a LoRA file from a file, a checkpoint folder or a run folder (the CLI's --lora)
"""

from .generate import ASPECT_RATIOS, GeneratedImage, GenerationSettings, generate, size_for
from .pipelines import LoraPipeline, lora_file_in
from .render import TrainingRenderer
from .samples import sample_grid, write_samples
from .sources import LoraSource, find_lora

__all__ = ["ASPECT_RATIOS", "GeneratedImage", "GenerationSettings", "LoraPipeline", "LoraSource", "TrainingRenderer",
           "find_lora", "generate", "lora_file_in", "sample_grid", "size_for", "write_samples"]
