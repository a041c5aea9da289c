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

from ..config import EngineConfig
from ..contract import canonical_version
from ..errors import BaseModelError, ConfigError, UnknownTrainingVersionError, did_you_mean
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
        raise ConfigError(f"unknown model family {name!r}{did_you_mean(name, FAMILIES)}; "
                          f"registered: {', '.join(sorted(FAMILIES))}") from None
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


def family_name_for_version(training_version: str, version_map: Mapping[str, str] | None = None) -> str:
    """The registered family that trains `training_version` in this deployment."""
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
    return name


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



def family_for_version(
    training_version: str, options: Mapping[str, Any] | None = None, version_map: Mapping[str, str] | None = None
) -> ModelFamily:
    return family_class(family_name_for_version(training_version, version_map))(options)


def family_for_config(training_version: str, config: EngineConfig, version_map: Mapping[str, str] | None = None,
                      *, source: str = "the engine config") -> ModelFamily:
    """The family that trains `training_version`, with the config's model options. A config written
    for another family (its `family:` key) is refused naming both families and the fix, before its
    model options could be blamed for it; `source` names the config (e.g. "--config FILE")."""
    mapping = version_map if version_map is not None else load_version_map()
    name = family_name_for_version(training_version, mapping)
    check_config_family(config, name, source=source, wanted_by=f"training_version {training_version!r} trains "
                        f"family {name}", version_map=mapping)
    return family_class(name)(config.model)


def check_config_family(config: EngineConfig, family: str, *, source: str, wanted_by: str,
                        version_map: Mapping[str, str] | None = None) -> None:
    """Refuse a config whose `family:` key names another family than `family`; `wanted_by` says
    who asks for `family`. A config without the key fits every family."""
    if config.family is None or config.family == family:
        return
    if config.family not in FAMILIES:
        raise ConfigError(f"{source}: family={config.family!r} is not a model family"
                          f"{did_you_mean(config.family, FAMILIES)}; registered: {', '.join(sorted(FAMILIES))}")
    versions = sorted(v for v, f in (version_map or {}).items() if f == config.family)
    other = f", or train a {config.family} version ({', '.join(versions)})" if versions else ""
    raise ConfigError(
        f"family mismatch: {source} is written for family {config.family} (its family: key), but {wanted_by}. "
        f"Pass a {family} config (configs/{family}.yaml, or configs/{family}-tiny.yaml "
        f"for the tiny demo base){other}."
    )


__all__ = ["FAMILIES", "LoadedModel", "ModelFamily", "check_config_family", "family_class", "family_for_base",
           "family_for_config", "family_for_version", "family_name_for_version", "load_version_map"]
