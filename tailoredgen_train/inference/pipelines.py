"""A family's pipeline loaded once and kept warm, serving many LoRA checkpoints: what the `generate`
command and the service's generation worker use."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from ..engine.checkpoint import LORA_FILE
from ..errors import LoraFileError
from ..families import ModelFamily
from .generate import GeneratedImage, GenerationSettings, generate


def lora_file_in(path: str | Path) -> Path:
    """The LoRA file a checkpoint folder holds, or the file itself."""
    path = Path(path).expanduser()
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        where = f"{path} has no {LORA_FILE}" if path.is_dir() else f"{path} does not exist"
        raise LoraFileError(f"LoRA {where}; pass a checkpoint folder (checkpoint-<step>/) or its {LORA_FILE}")
    return file


class LoraPipeline:
    """One base's pipeline on one device. `use(lora, influence)` loads a LoRA file as a named adapter
    (cached by resolved path, size and modification time; the `max_loaded` most recently used stay
    loaded) and makes it the only active one at that scale; `use(None)` runs the base alone.

    Calls are serialised by a lock, so one worker thread (or several) may share it; the pipeline it
    returns is only valid until the next `use`."""

    def __init__(self, family: ModelFamily, base: str, *, device: torch.device | str, dtype: torch.dtype,
                 max_loaded: int = 4):
        if max_loaded < 1:
            raise ValueError(f"max_loaded={max_loaded}: keep at least one LoRA loaded")
        self.family = family
        self.base = base
        self.max_loaded = max_loaded
        self.pipeline = family.load_pipeline(base, device=device, dtype=dtype)
        self._adapters: OrderedDict[tuple, str] = OrderedDict()  # file identity -> adapter name, LRU first
        self._counter = 0
        self._lock = threading.RLock()

    @property
    def loaded(self) -> list[Path]:
        """LoRA files loaded now, least recently used first."""
        return [Path(key[0]) for key in self._adapters]

    def use(self, lora: str | Path | None, influence: float = 1.0):
        """The pipeline with `lora` (a LoRA file or a checkpoint folder) active at `influence`."""
        GenerationSettings(influence=influence)  # the same range check as a request's
        with self._lock:
            if lora is None:
                self.family.activate_lora(self.pipeline, None)
                return self.pipeline
            file = lora_file_in(lora).resolve()
            stat = file.stat()
            key = (str(file), stat.st_size, stat.st_mtime_ns)  # a rewritten file is loaded afresh
            name = self._adapters.get(key)
            if name is None:
                name = self._load(file)
                self._adapters[key] = name
            self._adapters.move_to_end(key)
            self.family.activate_lora(self.pipeline, name, influence)
            return self.pipeline

    def check(self, lora: str | Path) -> None:
        """Load a LoRA file into the pipeline and unload it again: LoraFileError says why it does not fit."""
        with self._lock:
            self._counter += 1
            name = f"check_{self._counter}"
            self.family.load_lora(self.pipeline, lora_file_in(lora), name)
            self.family.unload_lora(self.pipeline, name)

    def _load(self, file: Path) -> str:
        for stale in [k for k in self._adapters if k[0] == str(file)]:  # an older version of this file
            self.family.unload_lora(self.pipeline, self._adapters.pop(stale))
        while len(self._adapters) >= self.max_loaded:
            _, evicted = self._adapters.popitem(last=False)
            self.family.unload_lora(self.pipeline, evicted)
        self._counter += 1
        name = f"lora_{self._counter}"
        self.family.load_lora(self.pipeline, file, name)
        return name

    def generate(self, lora: str | Path | None, prompts: list[str],
                 settings: GenerationSettings) -> list[GeneratedImage]:
        """`use(lora, settings.influence)`, then `generate` with prompts already prepared."""
        with self._lock:
            return generate(self.use(lora, settings.influence), self.family, prompts, settings)
