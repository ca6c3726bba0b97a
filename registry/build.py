"""Build: spec + overrides -> selection -> modules on a device -> an AssembledModel with its manifest.

Modules are always constructed on the meta device first (instant, no memory), converted to the
spec's dtype there, then either left on meta, loaded from a checkpoint, or allocated on the target
device and initialised as the reference initialises them. No weight is ever held twice.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from registry import hugepages
from registry.discovery import default_catalog
from registry.errors import InvalidSpecError, PluginLoadError, UnknownOverrideError, UnknownPresetError
from registry.hooks import manager
from registry.interfaces import AttentionBackend, Family, HeadPlugin, Parts, PositionPlugin
from registry.model import AssembledModel
from registry.select import Selection, select
from registry.spec import SLOTS, ModelSpec, apply_overrides, read_spec_file, validate_spec

log = logging.getLogger(__name__)
SPEC_SUFFIXES = (".json", ".toml", ".yaml", ".yml")


def preset_table() -> dict[str, dict[str, Any]]:
    """Every preset: those of installed families, then those offered through the presets hook."""
    catalog = default_catalog()
    table: dict[str, dict[str, Any]] = {}
    for name in catalog.names("family"):
        try:
            family = catalog.get("family", name)
        except PluginLoadError:
            continue  # a broken family offers no presets; catalog() shows it with its error
        assert isinstance(family, Family)
        for preset, data in family.presets().items():
            table[preset] = {**data, "name": preset}
    for offered in manager().hook.registry_presets():
        for preset, data in (offered or {}).items():
            if preset in table:
                raise InvalidSpecError(f"preset '{preset}' is offered twice (by a family and by a hook plugin)")
            table[preset] = {**data, "name": preset}
    return table


def presets() -> list[str]:
    """Names of every preset, e.g. ``bloom-560m``."""
    return sorted(preset_table())


def _base_data(model: str | os.PathLike[str] | ModelSpec | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(model, ModelSpec):
        return model.to_dict()
    if isinstance(model, Mapping):
        return dict(model)
    text = os.fspath(model)
    if text.endswith(SPEC_SUFFIXES) and Path(text).is_file():
        return read_spec_file(text)
    table = preset_table()
    if text in table:
        return dict(table[text])
    raise UnknownPresetError(text, table)


def resolve_spec(
    model: str | os.PathLike[str] | ModelSpec | Mapping[str, Any], overrides: Mapping[str, Any]
) -> ModelSpec:
    """A validated spec from a preset name, spec file, dict or ModelSpec, with keyword overrides applied."""
    data = _base_data(model)
    if "family" not in data:
        raise InvalidSpecError("a spec needs a 'family' field")
    family = default_catalog().get("family", data["family"])
    config_fields = set(family.config_class.model_fields)  # type: ignore[attr-defined]
    data = apply_overrides(data, overrides, config_fields)
    spec = validate_spec(data, source=f"spec for '{data.get('name') or data['family']}'")
    changed = manager().hook.registry_resolve_spec(spec=spec)
    if changed is not None:
        if not isinstance(changed, ModelSpec):
            raise InvalidSpecError(f"a registry_resolve_spec hook returned {type(changed).__name__}, not a ModelSpec")
        spec = changed
    return spec


def split_build_options(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """Separate ``device`` (a build option only) from the spec overrides."""
    rest = dict(overrides)
    device = rest.pop("device", "cpu")
    return rest, str(torch.device(device))


def _distribution_version() -> str | None:
    try:
        return importlib.metadata.version("registry-transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def assemble(spec: ModelSpec, *, device: str, init: bool = True) -> AssembledModel:
    """Select components for ``spec`` and build the model on ``device``.

    Args:
        init: initialise weights as the reference does (False leaves them for a checkpoint to fill;
            the model then stays on the meta device).
    """
    catalog = default_catalog()
    device_type = torch.device(device).type
    selection = select(spec, catalog, device=device_type)
    family = selection.family
    resolved = spec.model_copy(
        update={
            "components": spec.components.model_copy(update={s: selection.choices[s].chosen or "auto" for s in SLOTS})
        }
    )
    parts = Parts(
        attention=_as(selection, "attention", AttentionBackend),
        position=_as(selection, "position", PositionPlugin),
        head=_as(selection, "head", HeadPlugin),
        cache=selection.components.get("cache"),  # type: ignore[arg-type]
    )
    context = family.build_context(spec.config)
    with torch.device("meta"):
        backbone = family.build_backbone(spec.config, parts, context)
        head = parts.head.create(family.head_context(spec.config, spec.task, backbone))
    manifest = _manifest(resolved, selection, device)
    model = AssembledModel(
        spec=resolved,
        family=family,
        backbone=backbone,
        head=head,
        attention=parts.attention,
        label_names=parts.head.capabilities.label_names,
        manifest=manifest,
    )
    model.to(getattr(torch, spec.dtype))
    model.manifest["memory"] = {"huge_pages": hugepages.why_not(device_type)}  # replaced by place() on the CPU
    if device_type != "meta" and init:
        model.to_empty(device=device)
        if device_type == "cpu":  # before the first write: the weights' pages are allocated as huge pages
            model.manifest["memory"] = hugepages.place(model, copy=False).as_dict()
        initialize(model, family, spec.config)
    model.eval()
    return model


def _as(selection: Selection, slot: str, kind: type) -> Any:
    component = selection.components.get(slot)
    assert isinstance(component, kind), f"{slot} resolved to {component!r}"
    return component


def initialize(model: nn.Module, family: Family, config: Any, only: set[str] | None = None) -> None:
    """Initialise parameters in place: the family's scheme for standard layers, ``reset_parameters``
    for any other module that owns tensors. ``only``: qualified module names to initialise."""
    for name, module in model.named_modules():
        if only is not None and name not in only:
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        with torch.no_grad():
            if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm):
                family.init_weights(module, config)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                raise InvalidSpecError(
                    f"module '{name}' ({type(module).__name__}) owns tensors but has no reset_parameters(); "
                    "a plugin module with parameters or buffers must define it"
                )


def _manifest(spec: ModelSpec, selection: Selection, device: str) -> dict[str, Any]:
    catalog = default_catalog()
    family_record = catalog.record("family", selection.family.name)
    return {
        "family": {
            "chosen": selection.family.name,
            "distribution": family_record.distribution,
            "version": family_record.version,
        },
        "components": {slot: choice.as_dict() for slot, choice in selection.choices.items()},
        "spec": spec.to_dict(),
        "device": device,
        "dtype": spec.dtype,
        "registry_version": _distribution_version(),
    }


def build(model: str | os.PathLike[str] | ModelSpec | Mapping[str, Any], **overrides: Any) -> AssembledModel:
    """Build a model with random weights (or none, on ``device="meta"``).

    Args:
        model: a preset name, a ModelSpec, a dict, or a path to a .toml/.yaml/.json spec file.
        overrides: a slot (``attention="sdpa"``), a spec field (``n_layer=2``, ``num_labels=3``), or a
            build option (``dtype="bfloat16"``, ``device="meta"``).

    Raises:
        UnknownPresetError, UnknownComponentError, UnknownOverrideError, InvalidSpecError,
        IncompatibleComponentsError.

    Example:
        >>> model = registry.build("bloom-7b1", attention="sdpa", dtype="bfloat16", device="meta")
    """
    spec_overrides, device = split_build_options(overrides)
    spec = resolve_spec(model, spec_overrides)
    built = assemble(spec, device=device)
    manager().hook.registry_build_finished(model=built, manifest=built.manifest)
    return built


def spec(model: str | os.PathLike[str] | ModelSpec | Mapping[str, Any], **overrides: Any) -> ModelSpec:
    """The validated spec a build would use (slots may still be ``auto``).

    Raises:
        UnknownOverrideError: for ``device`` (a build option) and unknown keys.
    """
    if "device" in overrides:
        raise UnknownOverrideError("device", [*SLOTS, "dtype", "(spec fields)"])
    return resolve_spec(model, overrides)


def explain(model: str | os.PathLike[str] | ModelSpec | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """Per slot: the chosen component, every candidate, and why each was accepted or refused.

    An explicit choice that cannot work is reported here rather than raised.
    """
    spec_overrides, device = split_build_options(overrides)
    resolved = resolve_spec(model, spec_overrides)
    selection = select(resolved, default_catalog(), device=torch.device(device).type, strict=False)
    return {
        "model": resolved.name or resolved.family,
        "family": resolved.family,
        "slots": {slot: choice.as_dict() for slot, choice in selection.choices.items()},
        "text": selection.explain_text(),
    }
