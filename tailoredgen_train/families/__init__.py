"""Model families behind a registry: a training_version names a family, a family is one module.

`configs/versions.yaml` maps every training_version to a family, so that a deployment can point
the `max` and `light` aliases elsewhere (`--version-map FILE`) without touching code.
"""

from __future__ import annotations

import json
from importlib import import_module
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..contract import canonical_version
from ..errors import BaseModelError, ConfigError, UnknownTrainingVersionError
from .base import LoadedModel, ModelFamily, is_local_path

# family name -> "module:Class"; imported lazily so that a family's heavy imports cost nothing
# until it is used.
FAMILIES: dict[str, str] = {
    "fibo": "tailoredgen_train.families.fibo:FiboFamily",
    "bria-3.2": "tailoredgen_train.families.bria32:Bria32Family",
    "bria-2.3": "tailoredgen_train.families.sdxl:Sdxl23Family",
}

DEFAULT_VERSION_MAP = Path(__file__).resolve().parents[2] / "configs" / "versions.yaml"


def family_class(name: str) -> type[ModelFamily]:
    try:
        module_name, class_name = FAMILIES[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown model family {name!r}; registered: {', '.join(sorted(FAMILIES))}") from None
    return getattr(import_module(module_name), class_name)


def load_version_map(path: str | Path | None = None) -> dict[str, str]:
    """training_version -> family name, from configs/versions.yaml or a deployment's own file."""
    source = Path(path) if path else DEFAULT_VERSION_MAP
    try:
        raw = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise ConfigError(f"version map {source} does not exist; pass --version-map FILE "
                          "(see configs/versions.yaml for the format)") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("versions"), dict):
        raise ConfigError(f"version map {source} must have a 'versions' mapping of training_version: family")
    return {canonical_version(v): str(f) for v, f in raw["versions"].items()}


def family_for_version(
    training_version: str, options: Mapping[str, Any] | None = None, version_map: Mapping[str, str] | None = None
) -> ModelFamily:
    version = canonical_version(training_version)
    mapping = version_map if version_map is not None else load_version_map()
    if version not in mapping:
        raise UnknownTrainingVersionError(
            f"training_version {training_version!r} has no model family in this deployment "
            f"(mapped: {', '.join(sorted(mapping))})."
        )
    name = mapping[version]
    if name not in FAMILIES:
        raise UnknownTrainingVersionError(
            f"training_version {training_version!r} maps to family {name!r}, which this build does not "
            f"include yet (available: {', '.join(sorted(FAMILIES))})."
        )
    return family_class(name)(options)


def family_for_base(base: str, options: Mapping[str, Any] | None = None) -> ModelFamily:
    """The family whose pipeline a diffusers-format base (folder or hub id) was saved with, from
    its model_index.json `_class_name`."""
    try:
        if is_local_path(base):
            index = json.loads((Path(base).expanduser() / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline

            index = DiffusionPipeline.load_config(base)
    except (OSError, ValueError) as exc:
        raise BaseModelError(
            f"base model {base} is not a diffusers-format pipeline ({type(exc).__name__}: {exc}); pass a directory "
            "saved by the family's pipeline (save_pretrained), with its model_index.json, or a hub id this machine "
            "can reach.") from None
    found = index.get("_class_name") if isinstance(index, dict) else None
    classes = {family_class(name).pipeline_class_name: name for name in FAMILIES}
    if found not in classes:
        raise BaseModelError(f"base model {base} is a {found or 'unnamed'} pipeline; the families here use "
                             f"{', '.join(f'{c} ({n})' for c, n in classes.items())}.")
    return family_class(classes[found])(options)


__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "family_class", "family_for_base", "family_for_version",
           "load_version_map"]
