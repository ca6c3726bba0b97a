"""Typed errors. Each says what was asked, what is allowed, and what to do."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RegistryError(Exception):
    """Base class of every error this library raises on purpose."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _listing(choices: Iterable[str]) -> str:
    names = sorted(choices)
    return ", ".join(names) if names else "(none)"


class UnknownComponentError(RegistryError, KeyError):
    """A component name that no installed plugin offers."""

    def __init__(self, kind: str, name: str, available: Iterable[str]):
        available = list(available)
        self.kind, self.name, self.available = kind, name, available
        super().__init__(f"{kind} '{name}' is unknown; available: {_listing(available)}{did_you_mean(name, available)}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class UnknownPresetError(RegistryError, KeyError):
    """A model name that is neither a preset nor a checkpoint folder."""

    def __init__(self, name: str, available: Iterable[str]):
        available = list(available)
        self.name, self.available = name, available
        super().__init__(
            f"model '{name}' is not a preset nor a spec file; presets: {_listing(available)}"
            f"{did_you_mean(name, available)}"
        )

    def __str__(self) -> str:
        return str(self.args[0])


class UnknownOverrideError(RegistryError, TypeError):
    """A keyword override that is neither a slot, a spec field nor a build option."""

    def __init__(self, key: str, allowed: Iterable[str]):
        allowed = list(allowed)
        self.key, self.allowed = key, allowed
        super().__init__(f"unknown override '{key}'; allowed keys: {_listing(allowed)}{did_you_mean(key, allowed)}")


class InvalidSpecError(RegistryError, ValueError):
    """A spec whose values are out of range or inconsistent with each other."""


class IncompatibleComponentsError(RegistryError, ValueError):
    """An explicit choice of component that cannot work with the rest of the spec."""

    def __init__(self, slot: str, name: str, reasons: list[str]):
        self.slot, self.name, self.reasons = slot, name, reasons
        why = "; ".join(reasons)
        super().__init__(f"{slot} '{name}' cannot be used here: {why}")


class NoCandidateError(RegistryError, ValueError):
    """`auto` found no component that fits a slot."""


class PluginLoadError(RegistryError, ImportError):
    """A plugin module failed to import, or does not provide what its entry point promises."""


class DuplicateComponentError(RegistryError, ValueError):
    """Two distributions offer the same component name."""


class CheckpointError(RegistryError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class InputError(RegistryError, ValueError):
    """Forward inputs that do not fit the model (token ids out of range, shapes that disagree)."""


class CapabilityError(RegistryError, ValueError):
    """A forward request that the chosen component declared it cannot serve."""


class TokenizerError(RegistryError, ValueError):
    """A tokenizer file that is missing, malformed or of another algorithm, or a call it cannot serve."""


class CacheOverflowError(InputError):
    """More tokens than a fixed-size KV cache was created to hold."""


class MissingDependencyError(RegistryError, ImportError):
    """An optional dependency a feature needs is not installed (the message says what to install)."""
