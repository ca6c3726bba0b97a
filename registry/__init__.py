"""registry: transformers assembled from plugins.

>>> import registry
>>> registry.presets()
>>> model = registry.build("bloom-560m", attention="sdpa", dtype="bfloat16", device="meta")
>>> model = registry.from_pretrained("path/to/checkpoint", attention="eager")
"""

from __future__ import annotations

from typing import Any

from registry.ab import ABReport, ab
from registry.build import build, explain, presets, spec
from registry.checkpoints import from_pretrained, save_pretrained
from registry.discovery import ComponentRecord, configure, default_catalog
from registry.errors import (
    CacheOverflowError,
    CapabilityError,
    CheckpointError,
    DuplicateComponentError,
    IncompatibleComponentsError,
    InputError,
    InvalidSpecError,
    MissingDependencyError,
    NoCandidateError,
    PluginLoadError,
    RegistryError,
    UnknownComponentError,
    UnknownOverrideError,
    UnknownPresetError,
)
from registry.hooks import register_hooks, unregister_hooks
from registry.hookspecs import hookimpl
from registry.interfaces import Component
from registry.model import AssembledModel
from registry.spec import ModelSpec

__all__ = [
    "ABReport",
    "AssembledModel",
    "CacheOverflowError",
    "CapabilityError",
    "CheckpointError",
    "ComponentRecord",
    "DuplicateComponentError",
    "IncompatibleComponentsError",
    "InputError",
    "MissingDependencyError",
    "InvalidSpecError",
    "ModelSpec",
    "NoCandidateError",
    "PluginLoadError",
    "RegistryError",
    "UnknownComponentError",
    "UnknownOverrideError",
    "UnknownPresetError",
    "ab",
    "build",
    "catalog",
    "configure",
    "explain",
    "from_pretrained",
    "hookimpl",
    "presets",
    "register",
    "register_hooks",
    "reset",
    "save_pretrained",
    "spec",
    "tokenizer",
    "unregister",
    "unregister_hooks",
]


def catalog(*, load: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Every component by kind: name, status, distribution, version, capabilities.

    Listing reads entry-point metadata only; ``load=True`` imports every plugin to fill in its
    capabilities and discover broken ones.
    """
    listing = default_catalog().listing(load=load)
    return {kind: [r.as_dict() for r in records] for kind, records in listing.items()}


def register(component: Component, *, replace: bool = False) -> None:
    """Add a component in-process (tests, notebooks), as if a distribution offered it."""
    default_catalog().register(component, replace_existing=replace)


def unregister(kind: str, name: str) -> None:
    """Remove a component added with :func:`register`."""
    default_catalog().unregister(kind, name)


def reset() -> None:
    """Forget loaded plugins, registrations and hook plugins; re-read the environment."""
    from registry import discovery, hooks

    discovery.reset()
    hooks.reset()


def tokenizer(path: str, *, name: str = "auto") -> Any:
    """Load a tokenizer from a checkpoint folder, a tokenizer.json or a vocab.txt.

    Args:
        name: a tokenizer plugin, or ``auto`` for the first installed one that can read ``path``.

    Raises:
        UnknownComponentError: ``name`` is not installed; NoCandidateError: nothing can read ``path``.
    """
    catalog_ = default_catalog()
    names = [name] if name != "auto" else catalog_.names("tokenizer")
    reasons = []
    for candidate in names:
        try:
            plugin = catalog_.get("tokenizer", candidate)
        except PluginLoadError as error:
            if name != "auto":
                raise
            reasons.append(f"{candidate}: {error}")  # a broken plugin does not stop the others
            continue
        why = plugin.can_load(path)  # type: ignore[attr-defined]
        if not why:
            return plugin.load(path)  # type: ignore[attr-defined]
        reasons.append(f"{candidate}: {'; '.join(why)}")
    raise NoCandidateError(f"no tokenizer plugin can read '{path}': " + ("; ".join(reasons) or "none installed"))
