"""Cross-cutting hooks (pluggy). They run at build time, never per token.

Implementations come from the ``registry.hooks`` entry-point group (loaded when a hook first
fires) or from :func:`registry.register_hooks`.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "registry"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def registry_presets() -> dict[str, dict[str, Any]]:  # type: ignore[empty-body]
    """Return presets this plugin offers: name -> spec data (``family``, ``config``, ...)."""


@hookspec(firstresult=True)
def registry_resolve_spec(spec: Any) -> Any:
    """Return a changed ModelSpec before selection, or None to leave it. The first non-None wins;
    the change is recorded in the manifest."""


@hookspec
def registry_build_finished(model: Any, manifest: dict[str, Any]) -> None:
    """Called once a model is built (and loaded, for from_pretrained)."""


@hookspec
def registry_ab_metrics(a: Any, b: Any) -> dict[str, float] | None:  # type: ignore[empty-body]
    """Extra metrics for an A/B comparison of two forward outputs: name -> value."""
