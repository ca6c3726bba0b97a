"""Selection: each slot checked against the spec and against the other slots.

For every slot, every catalogued candidate is either accepted or refused with reasons. An explicit
choice that is refused is an :class:`IncompatibleComponentsError` listing the reasons; ``auto``
takes the family's default if it is accepted, else the accepted candidate of highest priority, and
records why. Nothing falls back silently: the choice and its reason are in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from registry.discovery import Catalog
from registry.errors import IncompatibleComponentsError, NoCandidateError, PluginLoadError, UnknownComponentError
from registry.interfaces import (
    AttentionBackend,
    CachePlugin,
    Component,
    Family,
    HeadPlugin,
    PositionPlugin,
    SelectionContext,
    TokenizerPlugin,
)
from registry.spec import AUTO, ModelSpec

# slots are resolved in this order: each one is checked against those before it
ORDER: tuple[str, ...] = ("head", "position", "attention", "cache", "tokenizer")
# slots whose absence does not stop a build (a model needs no tokenizer to run)
OPTIONAL: frozenset[str] = frozenset({"tokenizer"})


@dataclass
class Candidate:
    name: str
    accepted: bool
    reasons: list[str]
    distribution: str | None = None
    version: str | None = None


@dataclass
class SlotChoice:
    """What one slot resolved to, and why."""

    slot: str
    requested: str
    chosen: str | None
    reason: str
    candidates: list[Candidate] = field(default_factory=list)
    distribution: str | None = None
    version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "chosen": self.chosen,
            "reason": self.reason,
            "distribution": self.distribution,
            "version": self.version,
            "candidates": [
                {"name": c.name, "accepted": c.accepted, "reasons": c.reasons, "distribution": c.distribution}
                for c in self.candidates
            ],
        }


@dataclass
class Selection:
    family: Family
    components: dict[str, Component | None]
    choices: dict[str, SlotChoice]

    def explain_text(self) -> str:
        lines = []
        for slot, choice in self.choices.items():
            lines.append(f"{slot}: {choice.chosen or '(none)'}  [{choice.reason}]")
            for c in choice.candidates:
                mark = "+" if c.accepted else "-"
                why = "; ".join(c.reasons) if c.reasons else "accepted"
                lines.append(f"   {mark} {c.name}: {why}")
        return "\n".join(lines)


def refusals(component: Component, slot: str, ctx: SelectionContext) -> list[str]:
    """Why ``component`` cannot fill ``slot`` in ``ctx`` (empty: it can)."""
    reasons: list[str] = []
    chosen = ctx.chosen
    if isinstance(component, AttentionBackend):
        caps = component.capabilities
        if ctx.device not in caps.devices:
            reasons.append(f"runs on {_names(caps.devices)}, not {ctx.device}")
        if ctx.dtype not in caps.dtypes:
            reasons.append(f"accepts dtypes {_names(caps.dtypes)}, not {ctx.dtype}")
        if caps.max_head_dim is not None and ctx.head_dim > caps.max_head_dim:
            reasons.append(f"head_dim {ctx.head_dim} exceeds its maximum {caps.max_head_dim}")
        position = chosen.get("position")
        if isinstance(position, PositionPlugin) and position.capabilities.bias_kind:
            kind = position.capabilities.bias_kind
            if kind not in caps.bias_kinds:
                reasons.append(
                    f"position '{position.name}' needs a '{kind}' score bias; it accepts "
                    f"{_names(caps.bias_kinds) or 'no bias'}"
                )
        cache = chosen.get("cache")
        if isinstance(cache, CachePlugin) and cache.capabilities.graph_capture and not caps.graph_capture:
            reasons.append(f"cache '{cache.name}' captures CUDA graphs; this backend is not capturable")
        if ctx.family_capabilities.causal and not caps.decode:
            reasons.append("cannot attend with fewer queries than keys (cached decoding)")
    elif isinstance(component, PositionPlugin):
        caps_p = component.capabilities
        missing = sorted(f for f in caps_p.requires_config if getattr(ctx.config, f, None) is None)
        if missing:
            reasons.append(f"needs config field(s) {', '.join(missing)}, which family '{ctx.family}' lacks")
        unsupported = caps_p.effects - ctx.family_capabilities.position_effects
        if unsupported:
            reasons.append(f"family '{ctx.family}' does not apply position effect(s) {_names(unsupported)}")
    elif isinstance(component, CachePlugin):
        caps_c = component.capabilities
        if ctx.device not in caps_c.devices:
            reasons.append(f"runs on {_names(caps_c.devices)}, not {ctx.device}")
        if not ctx.family_capabilities.causal:
            reasons.append(f"family '{ctx.family}' is an encoder (no cached decoding)")
        attention = chosen.get("attention")
        if (
            caps_c.graph_capture
            and isinstance(attention, AttentionBackend)
            and not attention.capabilities.graph_capture
        ):
            reasons.append(f"attention '{attention.name}' cannot be captured in a CUDA graph")
    elif isinstance(component, HeadPlugin):
        caps_h = component.capabilities
        missing_parts = caps_h.needs - ctx.family_capabilities.head_parts
        if missing_parts:
            reasons.append(f"needs {_names(missing_parts)}, which family '{ctx.family}' does not offer")
        if caps_h.decoder_only and not ctx.family_capabilities.causal:
            reasons.append(f"needs a causal family; '{ctx.family}' is an encoder")
    elif isinstance(component, TokenizerPlugin):
        pass
    reasons.extend(component.refusals(ctx))
    return reasons


def _names(values: Any) -> str:
    return ", ".join(sorted(values))


def _priority(component: Component) -> int:
    return int(getattr(component.capabilities, "priority", 0))


def select(spec: ModelSpec, catalog: Catalog, *, device: str, strict: bool = True) -> Selection:
    """Resolve every slot of ``spec``.

    Args:
        strict: raise on an explicit choice that is refused (``explain`` passes False to report it).

    Raises:
        UnknownComponentError: a slot names a component nobody offers.
        IncompatibleComponentsError: an explicit choice that cannot work, with the reasons.
        NoCandidateError: ``auto`` found nothing for a required slot.
    """
    family = catalog.get("family", spec.family)
    assert isinstance(family, Family)
    build = family.build_context(spec.config)
    family_capabilities = family.capabilities_for(spec.config)
    # an encoder has no cached decoding: its cache slot may stay empty
    optional = OPTIONAL if family_capabilities.causal else OPTIONAL | {"cache"}
    base = dict(
        family=family.name,
        config=spec.config,
        device=device,
        dtype=spec.dtype,
        num_heads=build.num_heads,
        head_dim=build.head_dim,
        family_capabilities=family_capabilities,
    )
    requested = spec.components.model_dump()
    chosen: dict[str, Component] = {}
    # explicit choices constrain the automatic ones, whatever their order
    for slot in ORDER:
        if requested[slot] != AUTO:
            chosen[slot] = _load(catalog, slot, requested[slot])
    components: dict[str, Component | None] = {}
    choices: dict[str, SlotChoice] = {}
    for slot in ORDER:
        others = {k: v for k, v in chosen.items() if k != slot}
        ctx = SelectionContext(**base, chosen=others)  # type: ignore[arg-type]
        candidates = []
        for name in catalog.names(slot, usable_only=False):
            record = catalog.record(slot, name)
            if record.status != "ok":
                candidates.append(Candidate(name, False, [f"{record.status}: {record.error}"], record.distribution))
                continue
            try:
                component = catalog.get(slot, name)
            except PluginLoadError as error:
                candidates.append(Candidate(name, False, [str(error)], record.distribution))
                continue
            why = refusals(component, slot, ctx)
            candidates.append(Candidate(name, not why, why, record.distribution, record.version))
        choice = _choose(slot, requested[slot], family, candidates, catalog, strict, optional)
        if choice.chosen is not None:
            chosen[slot] = catalog.get(slot, choice.chosen)
            rec = catalog.record(slot, choice.chosen)
            choice.distribution, choice.version = rec.distribution, rec.version
        components[slot] = chosen.get(slot) if choice.chosen is not None else None
        choices[slot] = choice
    return Selection(family=family, components=components, choices=choices)


def _load(catalog: Catalog, slot: str, name: str) -> Component:
    try:
        return catalog.get(slot, name)
    except UnknownComponentError:
        raise
    except PluginLoadError as error:
        raise IncompatibleComponentsError(slot, name, [str(error)]) from error


def _choose(
    slot: str,
    requested: str,
    family: Family,
    candidates: list[Candidate],
    catalog: Catalog,
    strict: bool,
    optional: frozenset[str] = OPTIONAL,
) -> SlotChoice:
    by_name = {c.name: c for c in candidates}
    if requested != AUTO:
        c = by_name[requested]
        if not c.accepted and strict:
            raise IncompatibleComponentsError(slot, requested, c.reasons)
        reason = "requested" if c.accepted else "requested, but refused: " + "; ".join(c.reasons)
        return SlotChoice(slot, requested, requested if c.accepted else None, reason, candidates)
    accepted = [c for c in candidates if c.accepted]
    preferred = family.defaults.get(slot)
    if preferred is not None and preferred in by_name and by_name[preferred].accepted:
        return SlotChoice(slot, AUTO, preferred, f"auto: family '{family.name}' default", candidates)
    if accepted:
        best = max(accepted, key=lambda c: (_priority(catalog.get(slot, c.name)), c.name))
        why = f"auto: highest priority of {len(accepted)} accepted"
        if preferred is not None:
            state = "refused" if preferred in by_name else "not installed"
            why += f" (family default '{preferred}' {state})"
        return SlotChoice(slot, AUTO, best.name, why, candidates)
    if slot in optional:
        return SlotChoice(slot, AUTO, None, "auto: no candidate accepted; the slot stays empty", candidates)
    if strict:
        detail = "; ".join(f"{c.name}: {', '.join(c.reasons)}" for c in candidates) or "none installed"
        raise NoCandidateError(f"no {slot} fits family '{family.name}': {detail}")
    return SlotChoice(slot, AUTO, None, "auto: no candidate accepted", candidates)
