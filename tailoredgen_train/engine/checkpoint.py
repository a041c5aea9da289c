"""Checkpointer: folders that are complete or absent, never half-written.

Two kinds, both committed the same way (files into a staging folder, fsync, a manifest with each
file's sha256 written last, one rename into place):

    OUTPUT/checkpoint-<step>/          published LoRA, kept for every checkpoint step
        pytorch_lora_weights.safetensors   (the family's pipeline loads this folder)
        manifest.json
    OUTPUT/resume/step-<step>/         resume state, kept for the two newest valid steps only
        adapter.safetensors  optimizer.pt  state.json  manifest.json

A folder counts only if its manifest verifies: "latest" is the newest folder that verifies, never
just the highest number. Resume files are streamed into the staging folder and hashed as they are
written (no copy of their bytes in memory, no read-back), and a folder this process committed or
verified is not hashed again. Every file-system call goes through `Storage`, so tests can inject
disk faults and kills at each phase of a commit.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable, Literal

from ..errors import CheckpointWriteError

LORA_FILE = "pytorch_lora_weights.safetensors"
MANIFEST = "manifest.json"
FORMAT_VERSION = 2
KEEP_RESUME_STATES = 2  # the newest may be the one being written when the process dies
_PUBLISHED = re.compile(r"^checkpoint-(\d+)$")
_RESUME = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\..+\.(tmp|old)-\d+$")

log = logging.getLogger(__name__)
Kind = Literal["lora", "resume"]
Digest = tuple[int, str]
"""(bytes, sha256) of a file, as its manifest records them."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class HashingWriter:
    """A write-only file that hashes what passes through it (torch.save and safetensors write to it)."""

    def __init__(self, handle: BinaryIO):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += memoryview(data).nbytes
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


class Storage:
    """The file-system operations a checkpoint commit performs. `fault(phase, step)` is called at
    each phase of a commit ("<kind>.files_written", "<kind>.manifest_written", "<kind>.renamed",
    kind being lora or resume) and does nothing here; tests override it to kill or fail."""

    def fault(self, phase: str, step: int) -> None:
        pass

    def makedirs(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)

    def write_bytes(self, path: Path, data: bytes) -> None:
        self.write_stream(path, lambda handle: handle.write(data))

    def write_stream(self, path: Path, produce: Callable[[BinaryIO], object]) -> Digest:
        """`produce(handle)` writes the file's contents; returns their (bytes, sha256) once on disk."""
        with open(path, "wb") as handle:
            writer = HashingWriter(handle)
            produce(writer)
            handle.flush()
            os.fsync(handle.fileno())
        return writer.size, writer.digest.hexdigest()

    def fsync(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, source: Path, target: Path) -> None:
        os.replace(source, target)

    def rmtree(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """publish(step, write_lora) / save_resume(step, files) / latest_resume() / verify(path).
    Only the main process writes; the others get the paths and nothing happens."""

    def __init__(self, output_dir: Path, *, is_main_process: bool = True, storage: Storage | None = None,
                 config_hash: str = ""):
        self.output_dir = Path(output_dir)
        self.resume_root = self.output_dir / "resume"
        self.is_main_process = is_main_process
        self.storage = storage or Storage()
        self.config_hash = config_hash
        self._valid_resume: dict[int, bool] = {}
        """Resume steps this process committed or verified: they are not hashed again."""

    def path_for(self, step: int) -> Path:
        return self.output_dir / f"checkpoint-{step}"

    def resume_path_for(self, step: int) -> Path:
        return self.resume_root / f"step-{step}"

    # ---- writing ------------------------------------------------------------------------------

    def publish(self, step: int, write_lora: Callable[[Path], None]) -> Path:
        """`write_lora(staging_dir)` writes the LoRA file (the family's own saver does the format)."""
        return self._write(self.path_for(step), step, "lora", write_lora)

    def save_resume(self, step: int, files: dict[str, Callable[[BinaryIO], object]]) -> Path:
        """Commit a resume state, each file streamed by `files[name](handle)` and hashed as it is
        written, then drop all but the newest KEEP_RESUME_STATES valid ones."""
        digests: dict[str, Digest] = {}

        def write(staging: Path) -> None:
            for name, produce in files.items():
                digests[name] = self.storage.write_stream(staging / name, produce)

        path = self._write(self.resume_path_for(step), step, "resume", write, digests)
        if self.is_main_process:
            self._valid_resume[step] = True
            self._purge_resume_states()
        return path

    def _write(self, final: Path, step: int, kind: Kind, write: Callable[[Path], object],
               digests: dict[str, Digest] | None = None) -> Path:
        """`digests`: filled by `write` with the files it hashed (and fsynced) as it wrote them."""
        if not self.is_main_process:
            return final
        staging = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            self.storage.makedirs(final.parent)
            self.storage.rmtree(staging)
            self.storage.makedirs(staging)
            write(staging)
            self._commit(staging, final, step, kind, digests or {})
        except OSError as exc:
            self.storage.rmtree(staging)
            hint = " The disk is full: free space or point --output at a larger volume." \
                if exc.errno == errno.ENOSPC else ""
            previous = self.latest_resume()
            raise CheckpointWriteError(
                f"writing the {kind} checkpoint for step {step} to {final} failed: {exc}.{hint} Nothing was "
                f"published for this step; the newest valid resume state is "
                f"{previous if previous else 'none'}, and `--resume` continues from it."
            ) from exc
        return final

    def _commit(self, staging: Path, final: Path, step: int, kind: Kind, digests: dict[str, Digest]) -> None:
        """`digests`: the files hashed (and fsynced) as they were written; the others are read back."""
        files = {str(p.relative_to(staging)): p for p in sorted(staging.rglob("*")) if p.is_file()}
        for name, path in files.items():
            if name not in digests:
                self.storage.fsync(path)
        self.storage.fault(f"{kind}.files_written", step)
        described = {name: digests.get(name) or (path.stat().st_size, sha256_file(path)) for name, path in files.items()}
        manifest = {
            "format": FORMAT_VERSION,
            "kind": kind,
            "step": step,
            "config_hash": self.config_hash,
            "files": {name: {"bytes": size, "sha256": sha} for name, (size, sha) in described.items()},
        }
        self.storage.write_bytes(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        self.storage.fault(f"{kind}.manifest_written", step)
        if final.exists():  # a rerun of the same step: swap, so a valid copy exists at every moment
            retired = final.with_name(f".{final.name}.old-{os.getpid()}")
            self.storage.replace(final, retired)
            self.storage.replace(staging, final)
            self.storage.rmtree(retired)
        else:
            self.storage.replace(staging, final)
        self.storage.fsync(final.parent)
        self.storage.fault(f"{kind}.renamed", step)

    def _purge_resume_states(self) -> None:
        valid = [step for step in self.resume_steps() if self._resume_is_valid(step)]
        for step in self.resume_steps():
            if step not in valid[:KEEP_RESUME_STATES]:
                self.storage.rmtree(self.resume_path_for(step))
                self._valid_resume.pop(step, None)

    def _resume_is_valid(self, step: int) -> bool:
        """verify(), once per step and process: what it committed or checked before is not re-hashed."""
        if step not in self._valid_resume:
            self._valid_resume[step] = self.verify(self.resume_path_for(step), "resume")
        return self._valid_resume[step]

    def remove_leftovers(self) -> list[Path]:
        """Staging and retired folders a killed process left behind (never valid, safe to delete)."""
        removed = []
        for root in (self.output_dir, self.resume_root):
            if root.is_dir():
                for path in root.iterdir():
                    if path.is_dir() and _LEFTOVER.match(path.name):
                        self.storage.rmtree(path)
                        removed.append(path)
        return removed

    def remove_all(self) -> None:
        for step in self.published_steps():
            self.storage.rmtree(self.path_for(step))
        self.storage.rmtree(self.resume_root)
        self._valid_resume.clear()

    # ---- reading ------------------------------------------------------------------------------

    @staticmethod
    def verify(path: Path, kind: Kind = "lora") -> bool:
        """True when the manifest exists, is of `kind`, and every listed file has its recorded size and
        sha256 (safetensors itself does not notice a flipped byte)."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
            if manifest["kind"] != kind:
                return False
            for name, meta in manifest["files"].items():
                file = path / name
                if file.stat().st_size != meta["bytes"] or sha256_file(file) != meta["sha256"]:
                    return False
            required = {LORA_FILE} if kind == "lora" else {"adapter.safetensors", "optimizer.pt", "state.json"}
            return required <= set(manifest["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return False

    @staticmethod
    def _steps(root: Path, pattern: re.Pattern) -> list[int]:
        if not root.is_dir():
            return []
        return sorted((int(m.group(1)) for p in root.iterdir() if (m := pattern.match(p.name)) and p.is_dir()),
                      reverse=True)

    def published_steps(self) -> list[int]:
        """Steps with a published folder, newest first (verified or not)."""
        return self._steps(self.output_dir, _PUBLISHED)

    def resume_steps(self) -> list[int]:
        return self._steps(self.resume_root, _RESUME)

    def latest_resume(self) -> Path | None:
        """The newest resume state that verifies; damaged ones are skipped with a warning."""
        for step in self.resume_steps():
            path = self.resume_path_for(step)
            if self._resume_is_valid(step):
                return path
            log.warning("skipping resume state %s: its manifest is missing or does not match its files", path)
        return None
