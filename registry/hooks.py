"""The plugin manager that carries the hooks of :mod:`registry.hookspecs`."""

from __future__ import annotations

import logging
from typing import Any

import pluggy

from registry import hookspecs
from registry.discovery import default_catalog

log = logging.getLogger(__name__)
_manager: pluggy.PluginManager | None = None


def manager() -> pluggy.PluginManager:
    """The plugin manager, with entry-point hook plugins loaded on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for ep in default_catalog().hook_entry_points():
            try:
                pm.register(ep.load(), name=f"entry-point:{ep.name}")
            except Exception as error:  # a broken hook plugin is skipped, and says so
                log.warning("hook plugin '%s' (%s) failed to load: %s", ep.name, ep.value, error)
        _manager = pm
    return _manager


def register_hooks(plugin: Any, name: str | None = None) -> None:
    """Register an object or module whose functions are marked with ``registry.hookimpl``."""
    manager().register(plugin, name=name)


def unregister_hooks(plugin: Any) -> None:
    manager().unregister(plugin)


def reset() -> None:
    global _manager
    _manager = None
