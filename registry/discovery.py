"""Plugin discovery: entry points -> a catalog of components, loaded lazily.

Listing reads entry-point metadata only; a plugin module is imported the first time its component
is used. A plugin that fails to import is recorded as broken (with its error) and affects nothing
else. Two distributions offering one name make that name an error naming both.

Autoload and allow/deny work as in pytest:

* ``REGISTRY_DISABLE_PLUGIN_AUTOLOAD=1`` blocks every entry-point component not allowed explicitly;
* ``REGISTRY_PLUGINS_ALLOW`` / ``REGISTRY_PLUGINS_DENY``: comma-separated patterns, each
  ``name``, ``kind:name`` or ``dist:DISTRIBUTION``;
* :func:`configure` sets the same from code, and :func:`register` adds a component in-process.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any

from registry.errors import (
    DuplicateComponentError,
    PluginLoadError,
    UnknownComponentError,
)
from registry.interfaces import KINDS, Component

log = logging.getLogger(__name__)

GROUP_PREFIX = "registry."
HOOKS_GROUP = "registry.hooks"
ENV_AUTOLOAD = "REGISTRY_DISABLE_PLUGIN_AUTOLOAD"
ENV_ALLOW = "REGISTRY_PLUGINS_ALLOW"
ENV_DENY = "REGISTRY_PLUGINS_DENY"


@dataclass
class ComponentRecord:
    """One catalogued component.

    Attributes:
        status: "ok" (usable; imported once ``loaded``), "broken" (import failed or duplicate
            name; see ``error``) or "blocked" (autoload off, or denied).
        origin: "entry-point" or "register" (in-process).
        capabilities: known once loaded (None before: listing imports nothing).
    """

    kind: str
    name: str
    value: str
    distribution: str | None
    version: str | None
    status: str = "ok"
    error: str | None = None
    origin: str = "entry-point"
    loaded: bool = False
    capabilities: Any = None
    component: Component | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        caps = self.capabilities
        if caps is not None and hasattr(caps, "__dataclass_fields__"):
            caps = {k: _plain(getattr(caps, k)) for k in caps.__dataclass_fields__}
        return {
            "kind": self.kind,
            "name": self.name,
            "status": self.status,
            "distribution": self.distribution,
            "version": self.version,
            "value": self.value,
            "origin": self.origin,
            "loaded": self.loaded,
            "error": self.error,
            "capabilities": caps,
        }


def _plain(value: Any) -> Any:
    if isinstance(value, frozenset | set):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


@dataclass
class Policy:
    """Which entry-point components may load."""

    autoload: bool = True
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    @classmethod
    def from_environment(cls) -> Policy:
        return cls(
            autoload=os.environ.get(ENV_AUTOLOAD, "") in ("", "0", "false", "False"),
            allow=_split(os.environ.get(ENV_ALLOW)),
            deny=_split(os.environ.get(ENV_DENY)),
        )

    @staticmethod
    def _matches(pattern: str, record: ComponentRecord) -> bool:
        if pattern.startswith("dist:"):
            return record.distribution == pattern[5:]
        if ":" in pattern:
            return pattern == f"{record.kind}:{record.name}"
        return pattern == record.name

    def blocked_reason(self, record: ComponentRecord) -> str | None:
        if record.origin == "register":
            return None
        if any(self._matches(p, record) for p in self.deny):
            return "denied by the plugin deny list"
        allowed = any(self._matches(p, record) for p in self.allow)
        if self.allow and not allowed and self.autoload:
            return "not in the plugin allow list"
        if not self.autoload and not allowed:
            return f"plugin autoload is disabled ({ENV_AUTOLOAD}) and it is not allowed explicitly"
        return None


class Catalog:
    """Every component by kind and name."""

    def __init__(self, policy: Policy | None = None):
        self.policy = policy or Policy.from_environment()
        self._records: dict[tuple[str, str], ComponentRecord] | None = None
        self._registered: dict[tuple[str, str], ComponentRecord] = {}

    # -- listing --------------------------------------------------------------------------------

    def _scan(self) -> dict[tuple[str, str], ComponentRecord]:
        records: dict[tuple[str, str], ComponentRecord] = {}
        offers: dict[tuple[str, str], list[ComponentRecord]] = {}
        for kind in KINDS:
            for ep in metadata.entry_points(group=GROUP_PREFIX + kind):
                dist = getattr(ep, "dist", None)
                record = ComponentRecord(
                    kind=kind,
                    name=ep.name,
                    value=ep.value,
                    distribution=dist.metadata["Name"] if dist is not None else None,
                    version=dist.version if dist is not None else None,
                )
                same = offers.setdefault((kind, ep.name), [])
                # the same distribution seen twice on sys.path offers it once
                if not any(r.distribution == record.distribution and r.value == record.value for r in same):
                    same.append(record)
        for key, same in offers.items():
            record = same[0]
            if len(same) > 1:
                who = " and ".join(f"'{r.distribution}' ({r.value})" for r in same)
                record.status = "broken"
                record.error = f"{key[0]} '{key[1]}' is offered by two distributions: {who}; uninstall one"
            else:
                reason = self.policy.blocked_reason(record)
                if reason:
                    record.status, record.error = "blocked", reason
            records[key] = record
        return records

    @property
    def records(self) -> dict[tuple[str, str], ComponentRecord]:
        if self._records is None:
            self._records = self._scan()
        merged = dict(self._records)
        for key, record in self._registered.items():
            if key in merged and merged[key].origin == "entry-point":
                raise DuplicateComponentError(
                    f"{key[0]} '{key[1]}' is registered in-process but also offered by "
                    f"'{merged[key].distribution}'; pass replace=True to register() to override it"
                )
            merged[key] = record
        return merged

    def names(self, kind: str, *, usable_only: bool = True) -> list[str]:
        return sorted(
            r.name for (k, _), r in self.records.items() if k == kind and (not usable_only or r.status == "ok")
        )

    def listing(self, *, load: bool = False) -> dict[str, list[ComponentRecord]]:
        by_kind: dict[str, list[ComponentRecord]] = {kind: [] for kind in KINDS}
        for (kind, name), record in sorted(self.records.items()):
            if load and record.status == "ok" and not record.loaded:
                with contextlib.suppress(PluginLoadError):  # recorded as broken, with its error
                    self.get(kind, name)
            by_kind[kind].append(record)
        return by_kind

    # -- loading --------------------------------------------------------------------------------

    def get(self, kind: str, name: str) -> Component:
        """The component, importing its plugin module on first use.

        Raises:
            UnknownComponentError: nothing of that kind has that name.
            PluginLoadError: it is broken or blocked (the error says why).
        """
        if kind not in KINDS:
            raise UnknownComponentError("kind", kind, KINDS)
        record = self.records.get((kind, name))
        if record is None:
            raise UnknownComponentError(kind, name, self.names(kind))
        if record.status == "blocked":
            raise PluginLoadError(f"{kind} '{name}' is blocked: {record.error}")
        if record.status == "broken":
            raise PluginLoadError(f"{kind} '{name}' is broken: {record.error}")
        if record.component is None:
            self._load(record)
        assert record.component is not None
        return record.component

    def _load(self, record: ComponentRecord) -> None:
        module_name, _, attribute = record.value.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in filter(None, attribute.split(".")):
                obj = getattr(obj, part)
        except Exception as error:  # any failure inside a third-party import isolates that plugin
            record.status = "broken"
            record.error = f"import of {record.value} failed: {type(error).__name__}: {error}"
            log.warning("%s plugin '%s' is broken: %s", record.kind, record.name, record.error)
            raise PluginLoadError(f"{record.kind} '{record.name}' is broken: {record.error}") from error
        problem = _check_component(obj, record.kind, record.name)
        if problem:
            record.status, record.error = "broken", problem
            raise PluginLoadError(f"{record.kind} '{record.name}' is broken: {problem}")
        record.component, record.loaded, record.capabilities = obj, True, obj.capabilities

    # -- in-process registration -----------------------------------------------------------------

    def register(self, component: Component, *, replace_existing: bool = False) -> None:
        problem = _check_component(component, getattr(component, "kind", None), getattr(component, "name", None))
        if problem:
            raise PluginLoadError(problem)
        key = (component.kind, component.name)
        existing = self.records.get(key)
        if existing is not None and not replace_existing:
            raise DuplicateComponentError(
                f"{component.kind} '{component.name}' already exists (from "
                f"{existing.distribution or 'register()'}); pass replace=True to override it"
            )
        if existing is not None and existing.origin == "entry-point" and self._records is not None:
            del self._records[key]
        self._registered[key] = ComponentRecord(
            kind=component.kind,
            name=component.name,
            value=f"{type(component).__module__}:{type(component).__qualname__}",
            distribution=None,
            version=None,
            origin="register",
            loaded=True,
            capabilities=component.capabilities,
            component=component,
        )

    def unregister(self, kind: str, name: str) -> None:
        if self._registered.pop((kind, name), None) is None:
            raise UnknownComponentError(kind, name, [n for (k, n) in self._registered if k == kind])

    def record(self, kind: str, name: str) -> ComponentRecord:
        record = self.records.get((kind, name))
        if record is None:
            raise UnknownComponentError(kind, name, self.names(kind))
        return replace(record)

    def hook_entry_points(self) -> Iterable[metadata.EntryPoint]:
        for ep in metadata.entry_points(group=HOOKS_GROUP):
            dist = getattr(ep, "dist", None)
            record = ComponentRecord("hooks", ep.name, ep.value, dist.metadata["Name"] if dist else None, None)
            if self.policy.blocked_reason(record) is None:
                yield ep


def _check_component(obj: Any, kind: str | None, name: str | None) -> str | None:
    from registry import interfaces as i

    bases = {
        "family": i.Family,
        "attention": i.AttentionBackend,
        "position": i.PositionPlugin,
        "cache": i.CachePlugin,
        "tokenizer": i.TokenizerPlugin,
        "head": i.HeadPlugin,
    }
    if kind not in bases:
        return f"kind {kind!r} is not one of {', '.join(KINDS)}"
    if not isinstance(obj, bases[kind]):
        return f"{obj!r} is not a {bases[kind].__name__} instance"
    if getattr(obj, "name", None) != name:
        return f"its name {getattr(obj, 'name', None)!r} differs from the entry-point name {name!r}"
    if getattr(obj, "capabilities", None) is None:
        return "it declares no capabilities"
    return None


_catalog: Catalog | None = None


def default_catalog() -> Catalog:
    global _catalog
    if _catalog is None:
        _catalog = Catalog()
    return _catalog


def configure(*, autoload: bool | None = None, allow: list[str] | None = None, deny: list[str] | None = None) -> None:
    """Change the plugin policy (as the environment variables do) and rescan.

    Args:
        autoload: False blocks every entry-point component not in ``allow``.
        allow: patterns ``name``, ``kind:name`` or ``dist:NAME`` that may load.
        deny: patterns that may not load.
    """
    global _catalog
    old = default_catalog()
    policy = Policy(
        autoload=old.policy.autoload if autoload is None else autoload,
        allow=old.policy.allow if allow is None else list(allow),
        deny=old.policy.deny if deny is None else list(deny),
    )
    new = Catalog(policy)
    new._registered = old._registered
    _catalog = new


def reset() -> None:
    """Forget every loaded plugin and in-process registration; re-read the environment."""
    global _catalog
    _catalog = None
