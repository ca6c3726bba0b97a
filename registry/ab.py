"""A/B testing: two variants of one model on the same weights, the same inputs through both, and a verdict.

A variant is the model's spec with overrides applied: any slot (``attention``, ``position``,
``cache``, ...), spec field or build option (``dtype``, ``device``). Both variants are built on the
meta device and take the source model's tensors by assignment, so when dtype and device agree they
hold the very same tensors (one copy of the weights); a tensor is copied only to convert it.

The report has four parts:

* numerics: max and mean absolute and relative differences of every output field and of every
  layer's hidden states (in float32, over real tokens only), top-1 agreement and KL divergence of
  the predicted distributions, greedy-generation agreement for causal LMs, and the first layer
  whose difference exceeds the tolerance;
* speed: prefill latency, decode tokens/s and end-to-end generation latency, over interleaved
  repeats after a warm-up, with medians, spreads and the speedup of B over A with a bootstrap
  confidence interval;
* memory: peak bytes of each variant (weights + the peak of everything a run allocates);
* a verdict: whether B matches A within the tolerance, and which is faster, by how much.

docs/ab.md describes every field, and how the tolerance and the interval are computed.

Example:
    >>> report = registry.ab("bloom-560m", a={"attention": "eager"}, b={"attention": "sdpa"}, n_layer=2)
    >>> report.verdict.matches, report.verdict.first_divergent_layer
    (True, None)
    >>> report.plot("ab.png"); Path("ab.md").write_text(report.to_markdown())
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from registry.build import assemble, build, initialize, resolve_spec, split_build_options
from registry.discovery import default_catalog
from registry.errors import InputError, InvalidSpecError, MissingDependencyError
from registry.hooks import manager
from registry.model import AssembledModel
from registry.select import select
from registry.spec import SLOTS, ModelSpec

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE: dict[str, float] = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
"""Relative tolerance by the least precise dtype of the two variants (see :func:`default_tolerance`)."""

PRIMARY_FIELDS = ("logits", "prediction_logits", "start_logits", "last_hidden_state")
DISTRIBUTION_FIELDS = ("logits", "prediction_logits")
CONFIDENCE = 0.95
RESAMPLES = 1000

ModelLike = str | os.PathLike[str] | ModelSpec | Mapping[str, Any] | AssembledModel
Inputs = Tensor | Mapping[str, Tensor] | str | Sequence[str]
ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as the work advances (stages: build, numerics, warm-up, repeats)."""


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """Whether B matches A, and which is faster.

    Attributes:
        matches: every compared output and every layer is within ``tolerance`` (max relative difference).
        tolerance: the relative tolerance applied, and ``tolerance_source`` says where it came from.
        first_divergent_layer: index into the hidden states (0: the embeddings, i: the output of the
            i-th block) of the first layer over the tolerance; None if none is.
        faster: "a", "b", or "neither" when the confidence interval of the speedup contains 1.
        speedup: how many times faster B is than A on ``metric`` (> 1: B is faster).
        speedup_ci: its bootstrap confidence interval (95 %).
        metric: the speed metric the verdict uses: "generate" (end to end) for causal LMs, else
            "forward" ("prefill" for a decoder without the LM head).
        summary: the verdict in one sentence.
    """

    matches: bool
    tolerance: float
    tolerance_source: str
    first_divergent_layer: int | None
    faster: str
    speedup: float
    speedup_ci: tuple[float, float]
    metric: str
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ABReport:
    """The result of :func:`ab`: ``a`` and ``b`` (what each variant is), ``numerics``, ``speed``,
    ``memory`` and ``verdict``.

    Example:
        >>> report = registry.ab("bloom-560m", b={"attention": "sdpa"}, n_layer=2)
        >>> json.dumps(report.to_dict())
        >>> print(report.to_markdown())
        >>> report.plot("ab.png")
    """

    a: dict[str, Any]
    b: dict[str, Any]
    numerics: dict[str, Any]
    speed: dict[str, Any]
    memory: dict[str, Any]
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable data (non-finite numbers become None)."""
        data = {
            "a": self.a,
            "b": self.b,
            "numerics": self.numerics,
            "speed": self.speed,
            "memory": self.memory,
            "verdict": self.verdict.to_dict(),
        }
        return _finite(data)  # type: ignore[no-any-return]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def sections(self) -> list[tuple[str, list[str], list[list[str]]]]:
        """The report as (title, headers, rows) tables: what :meth:`to_markdown` and the CLI print."""
        return [
            ("Variants", *_variant_table(self.a, self.b)),
            ("Outputs", *_outputs_table(self.numerics)),
            ("Agreement", *_agreement_table(self.numerics)),
            ("Layers", *_layer_table(self.numerics)),
            ("Speed", *_speed_table(self.speed)),
            ("Memory", *_memory_table(self.memory)),
        ]

    def to_markdown(self) -> str:
        """A Markdown report: the verdict, then variants, numerics, layers, speed and memory tables."""
        lines = [f"# A/B: {self.a['model']}", "", f"**Verdict.** {self.verdict.summary}", ""]
        lines.append(f"Weights: {self.a['weights']['source']}. Inputs: {self.numerics['inputs']}.")
        for title, headers, rows in self.sections():
            if not rows:
                continue
            lines += ["", f"## {title}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines += ["", f"Memory: {self.memory['method']}", "", f"Speed: {self.speed['method']}", ""]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a figure: the per-layer difference, and the latency distributions of A and B side by side.

        Raises:
            MissingDependencyError: matplotlib is not installed (``pip install matplotlib``).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise MissingDependencyError(
                "report.plot() needs matplotlib: pip install matplotlib (or pip install 'registry-transformers[plot]')"
            ) from error
        timings = [(name, m) for name, m in self.speed["metrics"].items() if "a" in m]
        figure = Figure(figsize=(4.5 * (1 + len(timings)), 4), layout="constrained")
        axes = figure.subplots(1, 1 + len(timings), squeeze=False)[0]
        _plot_layers(axes[0], self.numerics, self.verdict)
        for axis, (name, metric) in zip(axes[1:], timings, strict=True):
            _plot_timings(axis, name, metric, self.a["label"], self.b["label"])
        figure.suptitle(f"A/B {self.a['model']}: {self.a['label']} vs {self.b['label']}")
        out = Path(path)
        figure.savefig(out, dpi=120)
        return out


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# -- variants on shared weights -------------------------------------------------------------------


@dataclass
class _Variant:
    label: str
    overrides: dict[str, Any]
    model: AssembledModel
    weights: dict[str, Any] = field(default_factory=dict)

    def describe(self, model_name: str) -> dict[str, Any]:
        manifest = self.model.manifest
        return {
            "label": self.label,
            "model": model_name,
            "overrides": self.overrides,
            "components": {slot: choice["chosen"] for slot, choice in manifest["components"].items()},
            "dtype": manifest["dtype"],
            "device": manifest["device"],
            "weights": self.weights,
        }


def _label(name: str, overrides: Mapping[str, Any]) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"{name} ({shown})" if shown else f"{name} (as built)"


def _source_model(model: ModelLike, overrides: Mapping[str, Any], seed: int) -> tuple[AssembledModel, str]:
    """The model whose weights both variants share, and where the weights came from."""
    if isinstance(model, AssembledModel):
        return model, "the given model's"
    if isinstance(model, str | os.PathLike) and Path(model).is_dir():
        from registry.checkpoints import from_pretrained

        return from_pretrained(model, **overrides), f"checkpoint {os.fspath(model)}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = build(model, **overrides)  # type: ignore[arg-type]
    return built, f"random (seed {seed}; the numbers compare backends, not model quality)"


def _check_device(device: str) -> None:
    """Raises: InvalidSpecError: a CUDA device asked of a torch that sees none."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InvalidSpecError(f"device '{device}' was asked for, but this torch sees no CUDA device")


def _check_variants(model: ModelLike, overrides: Mapping[str, Any], variants: Sequence[Mapping[str, Any]]) -> None:
    """Fail fast: resolve and select every variant of a preset or spec before any weight is made.

    Raises:
        UnknownPresetError, UnknownOverrideError, UnknownComponentError, InvalidSpecError,
        IncompatibleComponentsError.
    """
    if isinstance(model, AssembledModel) or (isinstance(model, str | os.PathLike) and Path(model).is_dir()):
        return  # built or read from a checkpoint: the variants are checked against it
    for variant in variants:
        spec_overrides, device = split_build_options({**overrides, **variant})
        _check_device(device)
        select(resolve_spec(model, spec_overrides), default_catalog(), device=torch.device(device).type)


def _variant_spec(source: AssembledModel, overrides: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    """The source's spec as requested (slots left to ``auto`` stay ``auto``), with ``overrides`` applied."""
    data = source.spec.to_dict()
    data["components"] = {slot: source.manifest["components"][slot]["requested"] for slot in SLOTS}
    spec_overrides, device = split_build_options({"device": str(source.device), **overrides})
    _check_device(device)
    return resolve_spec(data, spec_overrides), device


def _make_variant(label: str, source: AssembledModel, overrides: Mapping[str, Any], seed: int) -> _Variant:
    """Build a variant on the meta device and give it the source's tensors (converted only where needed).

    Raises:
        UnknownOverrideError, UnknownComponentError, InvalidSpecError, IncompatibleComponentsError:
            an override that does not apply, or that changes the shape of a weight.
    """
    spec, device = _variant_spec(source, overrides)
    model = assemble(spec, device=device, init=False)
    weights = _share_weights(source, model, torch.device(device), seed)
    model.tokenizer = source.tokenizer
    manager().hook.registry_build_finished(model=model, manifest=model.manifest)
    return _Variant(label, dict(overrides), model, weights)


def _share_weights(source: AssembledModel, target: AssembledModel, device: torch.device, seed: int) -> dict[str, Any]:
    """Assign the source's tensors to a meta-device ``target``; initialise what the source lacks."""
    theirs = source.state_dict()
    mine = target.state_dict()
    wrong = [
        f"{k} {list(theirs[k].shape)} -> {list(t.shape)}"
        for k, t in mine.items()
        if k in theirs and theirs[k].shape != t.shape
    ]
    if wrong:
        raise InvalidSpecError(
            "an A/B variant must keep the shape of every weight (both run on the same weights); these change: "
            + "; ".join(wrong[:5])
        )
    converted: dict[tuple[int, torch.dtype], Tensor] = {}  # tied tensors stay tied after a conversion
    assigned = {}
    for key, meta in mine.items():
        if key in theirs:
            tensor = theirs[key]
            memo = (tensor.data_ptr(), meta.dtype)
            if memo not in converted:
                converted[memo] = tensor.to(device=device, dtype=meta.dtype)
            assigned[key] = converted[memo]
    target.load_state_dict(assigned, strict=False, assign=True)
    initialized = _initialize_leftovers(target, device, seed)
    shared = sum(assigned[k].data_ptr() == theirs[k].data_ptr() for k in assigned)
    return {
        "tensors": len(mine),
        "shared": shared,
        "converted": len(assigned) - shared,
        "initialized": initialized,
        "unused": sorted(set(theirs) - set(mine)),
    }


def _initialize_leftovers(model: AssembledModel, device: torch.device, seed: int) -> list[str]:
    """Tensors a variant has and the source does not (another position encoding's weights, say):
    allocate and initialise them as a build would, seeded. Returns their names."""
    names = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if not names:
        return []
    modules = {n.rpartition(".")[0] for n in names}
    for name in modules:
        model.get_submodule(name).to_empty(device=device, recurse=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        initialize(model, model.family, model.spec.config, only=modules)
    log.warning("A/B variant has tensors the source model lacks; initialised them: %s", ", ".join(names))
    return names


# -- inputs -------------------------------------------------------------------------------------------


def _is_causal_lm(model: AssembledModel) -> bool:
    return bool(model.manifest["components"]["head"]["chosen"] == "causal-lm")


def _is_decoder(model: AssembledModel) -> bool:
    return bool(model.family.capabilities_for(model.config).causal)


def _default_inputs(model: AssembledModel, seed: int, batch: int = 2, length: int = 32) -> dict[str, Tensor]:
    """Seeded random token ids; the second row padded by a quarter (on the left for decoders, as
    generation needs, on the right otherwise)."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(config.vocab_size), (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    pad = length // 4
    padded = slice(0, pad) if _is_decoder(model) else slice(length - pad, length)
    mask[1:, padded] = 0
    pad_id = getattr(config, "pad_token_id", None) or 0
    return {"input_ids": ids.masked_fill(mask == 0, pad_id), "attention_mask": mask}


def _prepare_inputs(model: AssembledModel, inputs: Inputs | None, seed: int) -> dict[str, Tensor]:
    """Forward inputs (``input_ids``, ``attention_mask``, ...) on the CPU, from any accepted form.

    Raises:
        InputError: text without a tokenizer, or a mapping without ``input_ids``.
    """
    if inputs is None:
        return _default_inputs(model, seed)
    if isinstance(inputs, Tensor):
        ids = inputs if inputs.dim() > 1 else inputs[None]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError(f"A/B inputs need 'input_ids'; got {', '.join(inputs) or 'an empty mapping'}")
        data = dict(inputs)
        data.setdefault("attention_mask", torch.ones_like(data["input_ids"]))
        return data
    if model.tokenizer is None:
        raise InputError(
            "text inputs need a tokenizer: A/B a checkpoint folder with tokenizer files, or pass token ids"
        )
    texts = [inputs] if isinstance(inputs, str) else list(inputs)
    side = "left" if _is_decoder(model) else "right"
    batch = model.tokenizer(texts, padding=True, padding_side=side, return_tensors="pt")
    accepted = model.family.backbone_inputs  # type: ignore[attr-defined]
    return {k: v for k, v in batch.items() if k in accepted}


def _on(inputs: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in inputs.items()}


def _describe_inputs(inputs: Mapping[str, Tensor]) -> str:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    return f"{' x '.join(map(str, ids.shape))} token ids, {int(mask.sum())} real tokens"


# -- numerics -----------------------------------------------------------------------------------------


def default_tolerance(dtype_a: str, dtype_b: str) -> float:
    """The relative tolerance for comparing two dtypes: that of the less precise one.

    float32 against float32 allows 1e-4 (kernels that sum in another order differ by ~1e-6);
    float16 1e-2 and bfloat16 5e-2 (their rounding, 2^-11 and 2^-8, grows through the layers).
    """
    return max(DEFAULT_TOLERANCE[dtype_a], DEFAULT_TOLERANCE[dtype_b])


def _real(x: Tensor, mask: Tensor) -> Tensor:
    """Keep real-token positions of a (batch, tokens, ...) tensor; anything else as it is, flattened."""
    if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1) if x.dim() == 0 else x


def difference(x: Tensor, y: Tensor, mask: Tensor) -> dict[str, float]:
    """Absolute and relative differences of B's ``y`` from A's ``x`` over real tokens, in float32.

    Relative differences are scaled by A's magnitude, not per element (which explodes near zero):
    ``max_rel = max|x - y| / max|x|`` and ``mean_rel = mean|x - y| / mean|x|``.
    """
    x, y = _real(x.detach().float().cpu(), mask), _real(y.detach().float().cpu(), mask)
    diff = (x - y).abs()
    if diff.numel() == 0:
        return {"max_abs": 0.0, "mean_abs": 0.0, "max_rel": 0.0, "mean_rel": 0.0}
    tiny = torch.finfo(torch.float32).tiny
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    return {
        "max_abs": max_abs,
        "mean_abs": mean_abs,
        "max_rel": max_abs / max(float(x.abs().max()), tiny),
        "mean_rel": mean_abs / max(float(x.abs().mean()), tiny),
    }


def _within(stats: Mapping[str, float], tolerance: float) -> bool:
    return math.isfinite(stats["max_rel"]) and stats["max_rel"] <= tolerance


def _tensor_fields(out: Any) -> dict[str, Tensor]:
    return {k: v for k, v in out.items() if isinstance(v, Tensor) and v.is_floating_point()}


def _layer_name(index: int, count: int) -> str:
    if index == 0:
        return "embeddings"
    return f"block {index}" + (" + final norm" if index == count - 1 else "")


def _layers(out_a: Any, out_b: Any, mask: Tensor, tolerance: float) -> tuple[list[dict[str, Any]], str | None]:
    hidden_a, hidden_b = out_a.hidden_states, out_b.hidden_states
    if hidden_a is None or hidden_b is None:
        return [], "the family returns no hidden states"
    count = len(hidden_a)
    rows = []
    for i, (x, y) in enumerate(zip(hidden_a, hidden_b, strict=True)):
        stats = difference(x, y, mask)
        rows.append({"index": i, "name": _layer_name(i, count), **stats, "within": _within(stats, tolerance)})
    return rows, None


def _distributions(out_a: Any, out_b: Any, mask: Tensor) -> dict[str, Any]:
    """Top-1 agreement and KL(A || B) of the predicted distributions, at every real position."""
    name = next((f for f in DISTRIBUTION_FIELDS if f in out_a and f in out_b), None)
    if name is None:
        return {"skipped": "the head has no logits over a vocabulary or labels"}
    la, lb = _real(out_a[name].float().cpu(), mask), _real(out_b[name].float().cpu(), mask)
    if la.shape[-1] < 2:
        return {"skipped": f"'{name}' has a single output per position (regression), not a distribution"}
    log_a, log_b = la.log_softmax(-1), lb.log_softmax(-1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1).clamp_min(0)  # >= 0 in exact arithmetic
    agree = (la.argmax(-1) == lb.argmax(-1)).float()
    return {
        "field": name,
        "positions": int(agree.numel()),
        "top1_agreement": float(agree.mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }


def _greedy(tokens_a: Tensor | None, tokens_b: Tensor | None, prompt_length: int, why: str) -> dict[str, Any]:
    if tokens_a is None or tokens_b is None:
        return {"skipped": why}
    new_a, new_b = tokens_a[:, prompt_length:].cpu(), tokens_b[:, prompt_length:].cpu()
    same = new_a == new_b
    differ = (~same).any(0).nonzero()
    return {
        "new_tokens": int(new_a.shape[1]),
        "agreement": float(same.float().mean()) if same.numel() else 1.0,
        "first_difference_step": int(differ[0]) if differ.numel() else None,
        "tokens_a": new_a.tolist(),
        "tokens_b": new_b.tolist(),
    }


def _extra_metrics(out_a: Any, out_b: Any) -> dict[str, float]:
    """Metrics that hook plugins add through ``registry_ab_metrics``."""
    extra: dict[str, float] = {}
    for result in manager().hook.registry_ab_metrics(a=out_a, b=out_b):
        for name, value in (result or {}).items():
            if name in extra:
                log.warning("A/B metric '%s' is offered by two hook plugins; keeping the first", name)
                continue
            extra[name] = float(value)
    return extra


@torch.no_grad()
def _forward(model: AssembledModel, inputs: Mapping[str, Tensor]) -> Any:
    return model(**_on(inputs, model.device), use_cache=False, output_hidden_states=True)


def _numerics(
    va: _Variant, vb: _Variant, inputs: Mapping[str, Tensor], tokens: Mapping[str, Tensor | None], tolerance: float
) -> dict[str, Any]:
    out_a, out_b = _forward(va.model, inputs), _forward(vb.model, inputs)
    mask = inputs["attention_mask"]
    fields_a, fields_b = _tensor_fields(out_a), _tensor_fields(out_b)
    common = [k for k in fields_a if k in fields_b]
    fields = {k: difference(fields_a[k], fields_b[k], mask) for k in common}
    primary = next((f for f in PRIMARY_FIELDS if f in fields), common[0] if common else None)
    layers, layers_skipped = _layers(out_a, out_b, mask, tolerance)
    first = next((row["index"] for row in layers if not row["within"]), None)
    why_no_greedy = "greedy generation needs the causal-lm head on both variants"
    numerics: dict[str, Any] = {
        "inputs": _describe_inputs(inputs),
        "output": primary,
        **(fields[primary] if primary else {}),
        "fields": fields,
        "layers": layers,
        "first_divergent_layer": first,
        "distribution": _distributions(out_a, out_b, mask),
        "greedy": _greedy(tokens.get("a"), tokens.get("b"), inputs["input_ids"].shape[1], why_no_greedy),
        "extra": _extra_metrics(out_a, out_b),
    }
    if layers_skipped:
        numerics["layers_skipped"] = layers_skipped
    return numerics


# -- memory ---------------------------------------------------------------------------------------------


def _memory_of(tensor: Tensor) -> tuple[int, int, object]:
    """(identity, bytes, owner) of the memory behind a tensor: its storage, or the tensor itself for
    one without a storage (a weight packed into a kernel's opaque layout)."""
    try:
        storage = tensor.untyped_storage()
    except (NotImplementedError, RuntimeError):
        return id(tensor), tensor.numel() * tensor.element_size(), tensor
    # torch keeps a storage's Python object alive exactly as long as the storage: its id is stable
    return id(storage), storage.nbytes(), storage


def _storages(tensors: Sequence[Tensor]) -> dict[int, int]:
    """Bytes of each distinct storage behind ``tensors``, by storage identity."""
    return dict(_memory_of(t)[:2] for t in tensors if not t.is_meta)


class _PeakTracker(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while active, each counted until it is freed.

    Every op output whose storage is new (not one of its inputs') is counted when it appears and
    subtracted when its storage is released. Scratch memory inside a kernel is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {_memory_of(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and not t.is_meta}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or tensor.is_meta:
                continue
            key, size, owner = _memory_of(tensor)
            if key in given or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(owner, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


@contextmanager
def _peak_bytes(device: torch.device) -> Iterator[dict[str, int]]:
    """Measure the peak bytes a block allocates on ``device`` beyond what was allocated before it, and
    how many of them it leaves allocated (caches the model keeps, such as packed weights)."""
    result = {"peak": 0, "retained": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - before
        result["retained"] = torch.cuda.memory_allocated(device) - before
        return
    with _PeakTracker() as tracker:
        yield result
    result["peak"], result["retained"] = tracker.peak, tracker.current


def _memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "CUDA allocator: weights + (torch.cuda.max_memory_allocated during the run - memory allocated before it)"
    return (
        "tensor tracking on the CPU (no allocator counter there): weights + the peak bytes of live tensors "
        "that ops create during the run, counted at the dispatcher until freed; scratch memory inside a "
        "kernel is not seen"
    )


# -- speed ----------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Timing:
    prefill: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


@torch.no_grad()
def _forward_seconds(model: AssembledModel, inputs: Mapping[str, Tensor]) -> float:
    """Seconds for one forward over the inputs."""
    device = model.device
    fed = _on(inputs, device)
    _sync(device)
    start = time.perf_counter()
    model(**fed)
    _sync(device)
    return time.perf_counter() - start


def _generate(model: AssembledModel, inputs: Mapping[str, Tensor], new_tokens: int) -> tuple[Tensor, _Timing]:
    """Greedy generation of exactly ``new_tokens`` (EOS disabled), timed from the streamer's calls:
    prefill is the time to the first token, decode the span from the first token to the last."""
    device = model.device
    fed = _on(inputs, device)
    stamps: list[float] = []

    def on_token(tokens: Tensor) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        fed["input_ids"], fed["attention_mask"], max_new_tokens=new_tokens, eos_token_id=[], streamer=on_token
    )
    _sync(device)
    total = time.perf_counter() - start
    assert isinstance(out, Tensor) and len(stamps) == new_tokens, "generate() streams one call per new token"
    return out, _Timing(prefill=[stamps[0] - start], decode=[stamps[-1] - stamps[0]], generate=[total])


def _repeat(variant: _Variant, inputs: Mapping[str, Tensor], new_tokens: int, timing: _Timing | None) -> Tensor | None:
    """One repeat: a greedy generation for causal LMs, else a forward; recorded in ``timing`` unless
    it is None. Returns the generated tokens (None when nothing was generated)."""
    if _is_causal_lm(variant.model) and new_tokens > 0:
        tokens, measured = _generate(variant.model, inputs, new_tokens)
    else:
        tokens, measured = None, _Timing(prefill=[_forward_seconds(variant.model, inputs)])
    if timing is not None:
        timing.prefill += measured.prefill
        timing.decode += measured.decode
        timing.generate += measured.generate
    return tokens


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles, interquartile range, min and max of a list of measurements."""
    values = sorted(samples)
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": values[0],
        "max": values[-1],
        "samples": list(samples),
    }


def bootstrap_ci(
    a: Sequence[float],
    b: Sequence[float],
    statistic: Callable[[Sequence[float], Sequence[float]], float],
    *,
    seed: int = 0,
    resamples: int = RESAMPLES,
    level: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(a, b)``: resample each list with replacement.

    Example:
        >>> bootstrap_ci([1.0, 1.1, 0.9], [0.5, 0.6, 0.55], lambda a, b: median(a) / median(b))
    """
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(a, k=len(a)), rng.choices(b, k=len(b))) for _ in range(resamples))
    tail = (1 - level) / 2
    return values[int(tail * resamples)], values[math.ceil((1 - tail) * resamples) - 1]


def _speedup_of_latency(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(a) / statistics.median(b)


def _speedup_of_rate(a: Sequence[float], b: Sequence[float]) -> float:
    return statistics.median(b) / statistics.median(a)


def _compare_metric(a: Sequence[float], b: Sequence[float], unit: str, seed: int) -> dict[str, Any]:
    statistic = _speedup_of_rate if unit == "tokens/s" else _speedup_of_latency
    low, high = bootstrap_ci(a, b, statistic, seed=seed)
    return {
        "unit": unit,
        "a": summarize(a),
        "b": summarize(b),
        "speedup": statistic(a, b),
        "speedup_ci": [low, high],
        "faster": "b" if low > 1 else "a" if high < 1 else "neither",
    }


def _speed(
    timing_a: _Timing, timing_b: _Timing, *, batch: int, new_tokens: int, repeats: int, seed: int
) -> dict[str, Any]:
    generated = bool(timing_a.generate and timing_b.generate)
    decoded = batch * (new_tokens - 1)  # tokens made by decode steps (the first comes from the prefill)
    metrics = {("prefill" if generated else "forward"): _compare_metric(timing_a.prefill, timing_b.prefill, "s", seed)}
    if generated:
        metrics["generate"] = _compare_metric(timing_a.generate, timing_b.generate, "s", seed)
    if generated and new_tokens > 1:
        rate_a, rate_b = ([decoded / s if s > 0 else math.inf for s in t.decode] for t in (timing_a, timing_b))
        metrics["decode"] = _compare_metric(rate_a, rate_b, "tokens/s", seed)
    what = (
        f"generate = greedy generation of {new_tokens} tokens; prefill = its time to the first token; "
        "decode = tokens/s from the first token to the last"
        if generated
        else "forward = one forward over the inputs"
    )
    return {
        "method": (
            f"{repeats} repeats after a warm-up run, interleaved (A B, then B A, ...); {what}; speedup = how many "
            f"times faster B is (> 1: B), with a {CONFIDENCE:.0%} percentile-bootstrap interval over {RESAMPLES} "
            "resamples"
        ),
        "repeats": repeats,
        "new_tokens": new_tokens,
        "machine": _machine(),
        "metrics": metrics,
    }


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# -- verdict --------------------------------------------------------------------------------------------


def _verdict(numerics: dict[str, Any], speed: dict[str, Any], tolerance: float, source: str) -> Verdict:
    fields_ok = all(_within(stats, tolerance) for stats in numerics["fields"].values())
    layers_ok = all(row["within"] for row in numerics["layers"])
    matches = fields_ok and layers_ok and bool(numerics["fields"])
    metric = "generate" if "generate" in speed["metrics"] else next(iter(speed["metrics"]))
    chosen = speed["metrics"][metric]
    low, high = chosen["speedup_ci"]
    parts = [_match_sentence(numerics, matches, tolerance)]
    for name, m in speed["metrics"].items():
        parts.append(_speed_phrase(name, m))
    return Verdict(
        matches=matches,
        tolerance=tolerance,
        tolerance_source=source,
        first_divergent_layer=numerics["first_divergent_layer"],
        faster=chosen["faster"],
        speedup=chosen["speedup"],
        speedup_ci=(low, high),
        metric=metric,
        summary=parts[0] + "; " + ", ".join(parts[1:]) + ".",
    )


def _match_sentence(numerics: dict[str, Any], matches: bool, tolerance: float) -> str:
    values = [s["max_rel"] for s in numerics["fields"].values()]
    worst = math.nan if not values or any(math.isnan(v) for v in values) else max(values)
    if matches:
        return f"B matches A within {tolerance:.0e} (max relative difference {worst:.1e})"
    where = ""
    first = numerics["first_divergent_layer"]
    if first is not None:
        where = f", starting at layer {first} ({numerics['layers'][first]['name']})"
    elif numerics["layers"]:
        where = ", in the head's output only (every layer is within the tolerance)"
    return f"B does NOT match A: max relative difference {worst:.1e} > {tolerance:.0e}{where}"


def _speed_phrase(name: str, metric: dict[str, Any]) -> str:
    low, high = metric["speedup_ci"]
    ci = f"{CONFIDENCE:.0%} CI {low:.2f}-{high:.2f}"
    if metric["faster"] == "neither":
        return f"neither is faster at {name} ({metric['speedup']:.2f}x, {ci})"
    times = metric["speedup"] if metric["faster"] == "b" else 1 / metric["speedup"]
    return f"{metric['faster'].upper()} is {times:.2f}x faster at {name} ({ci})"


# -- the entry point ------------------------------------------------------------------------------------


def ab(
    model: ModelLike,
    a: Mapping[str, Any] | None = None,
    b: Mapping[str, Any] | None = None,
    *,
    inputs: Inputs | None = None,
    repeats: int = 5,
    new_tokens: int = 8,
    tolerance: float | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    **overrides: Any,
) -> ABReport:
    """Compare two variants of one model on the same weights and inputs: numerics, speed, memory.

    Args:
        model: a preset name, spec, spec file or dict (built with random weights, seeded), a checkpoint
            folder, or an already built model.
        a, b: overrides that make each variant from the model: slots (``attention="sdpa"``), spec fields,
            ``dtype``, ``device``. ``a == b`` is allowed (a null test: the speed difference is noise).
        inputs: token ids (batch, tokens), a mapping of forward inputs (``input_ids``,
            ``attention_mask``, ...), or text (through the model's tokenizer). Default: a seeded random
            2 x 32 batch whose second row is a quarter padding.
        repeats: timed repeats per variant (at least 2), interleaved, after one warm-up run each.
        new_tokens: tokens to generate greedily (causal LMs) for the agreement and decode speed.
        tolerance: relative tolerance (max |a - b| / max |a|); default: :func:`default_tolerance`.
        seed: seeds the random weights, the default inputs and the bootstrap.
        progress: called as ``progress(stage, done, total)`` while the work advances.
        overrides: shared overrides, as for :func:`registry.build` (``n_layer=2``), applied before ``a``, ``b``.

    Raises:
        UnknownPresetError, UnknownOverrideError, UnknownComponentError, InvalidSpecError,
        IncompatibleComponentsError: a model or an override that does not apply (or changes a weight's shape).
        InputError: inputs that do not fit, or ``repeats`` < 2, ``new_tokens`` < 0.

    Example:
        >>> report = registry.ab("bloom-560m", a={"attention": "eager"}, b={"attention": "sdpa"}, n_layer=2)
        >>> print(report.verdict.summary)
    """
    if repeats < 2 or new_tokens < 0:
        raise InputError(
            f"repeats must be >= 2 (a spread needs two) and new_tokens >= 0; got repeats={repeats}, "
            f"new_tokens={new_tokens}"
        )
    a, b = dict(a or {}), dict(b or {})
    step = progress or (lambda stage, done, total: None)
    step("build", 0, 3)
    _check_variants(model, overrides, (a, b))
    shared = overrides if isinstance(model, AssembledModel) else {}
    source, origin = _source_model(model, {} if isinstance(model, AssembledModel) else overrides, seed)
    step("build", 1, 3)
    va = _make_variant("A", source, {**shared, **a}, seed)
    step("build", 2, 3)
    vb = _make_variant("B", source, {**shared, **b}, seed)
    step("build", 3, 3)
    del source  # the variants hold the weights now
    name = va.model.spec.name or va.model.spec.family
    va.weights["source"] = vb.weights["source"] = origin
    fed = _prepare_inputs(va.model, inputs, seed)

    dtypes = (va.model.spec.dtype, vb.model.spec.dtype)
    if tolerance is None:
        tolerance, tolerance_source = default_tolerance(*dtypes), f"default for {dtypes[0]} vs {dtypes[1]}"
    else:
        tolerance_source = "given"

    memory, tokens = _memory_and_tokens(va, vb, fed, new_tokens, step)
    step("numerics", 0, 1)
    numerics = _numerics(va, vb, fed, tokens, tolerance)
    step("numerics", 1, 1)
    timing = _time_interleaved(va, vb, fed, new_tokens, repeats, step)
    batch = int(fed["input_ids"].shape[0])
    speed = _speed(*timing, batch=batch, new_tokens=new_tokens, repeats=repeats, seed=seed)
    verdict = _verdict(numerics, speed, tolerance, tolerance_source)
    log.info("A/B %s: %s", name, verdict.summary)
    return ABReport(
        a={**va.describe(name), "label": _label("A", a)},
        b={**vb.describe(name), "label": _label("B", b)},
        numerics=numerics,
        speed=speed,
        memory=memory,
        verdict=verdict,
    )


def _memory_and_tokens(
    va: _Variant, vb: _Variant, inputs: Mapping[str, Tensor], new_tokens: int, step: ProgressCallback
) -> tuple[dict[str, Any], dict[str, Tensor | None]]:
    """Run each variant once (a prefill, and a generation for causal LMs) while measuring its peak
    memory; the generated tokens are kept for the greedy agreement. This first run is also each
    variant's warm-up: no timing is taken from it."""
    memory: dict[str, Any] = {"method": _memory_method(va.model.device)}
    tokens: dict[str, Tensor | None] = {}
    weights = {}
    for i, (key, variant) in enumerate((("a", va), ("b", vb))):
        step("memory", i, 2)
        with _peak_bytes(variant.model.device) as measured:
            tokens[key] = _repeat(variant, inputs, new_tokens, None)
        weights[key] = _storages([*variant.model.parameters(), *variant.model.buffers()])
        own = sum(weights[key].values())
        memory[key] = {
            "weights_bytes": own,
            "run_peak_bytes": measured["peak"],
            "retained_bytes": measured["retained"],
            "peak_bytes": own + measured["peak"],
        }
    step("memory", 2, 2)
    common = set(weights["a"]) & set(weights["b"])
    memory["shared_weight_bytes"] = sum(weights["a"][p] for p in common)
    return memory, tokens


def _time_interleaved(
    va: _Variant, vb: _Variant, inputs: Mapping[str, Tensor], new_tokens: int, repeats: int, step: ProgressCallback
) -> tuple[_Timing, _Timing]:
    """``repeats`` rounds alternating the order (A B, B A, ...) so that drift in the machine's speed
    falls on both alike. (Each variant's warm-up is its first run, in :func:`_memory_and_tokens`.)"""
    timings = {"A": _Timing(), "B": _Timing()}
    for r in range(repeats):
        step("repeats", r, repeats)
        for variant in (va, vb) if r % 2 == 0 else (vb, va):
            _repeat(variant, inputs, new_tokens, timings[variant.label])
    step("repeats", repeats, repeats)
    return timings["A"], timings["B"]


# -- tables and plots -----------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2e") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec) if math.isfinite(value) else str(value)
    return str(value)


def _variant_table(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    def weights(v: dict[str, Any]) -> str:
        w = v["weights"]
        text = f"{w['shared']} shared, {w['converted']} converted"
        return text + (f", {len(w['initialized'])} initialised" if w["initialized"] else "")

    rows = [
        [v["label"], *(v["components"][s] or "-" for s in SLOTS), v["dtype"], v["device"], weights(v)] for v in (a, b)
    ]
    return ["variant", *SLOTS, "dtype", "device", "weights"], rows


def _outputs_table(n: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [name, _fmt(s["max_abs"]), _fmt(s["mean_abs"]), _fmt(s["max_rel"]), _fmt(s["mean_rel"])]
        for name, s in n["fields"].items()
    ]
    return ["output", "max abs", "mean abs", "max rel", "mean rel"], rows


def _agreement_table(n: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    dist, greedy = n["distribution"], n["greedy"]
    rows = []
    if "skipped" in dist:
        rows.append(["top-1 agreement, KL", "skipped", dist["skipped"]])
    else:
        where = f"'{dist['field']}' at {dist['positions']} real positions"
        rows.append(["top-1 agreement", f"{dist['top1_agreement']:.1%}", where])
        rows.append(["KL(A || B)", f"mean {_fmt(dist['kl_mean'])}, max {_fmt(dist['kl_max'])}", where])
    if "skipped" in greedy:
        rows.append(["greedy tokens", "skipped", greedy["skipped"]])
    else:
        step = greedy["first_difference_step"]
        first = "no difference" if step is None else f"first difference at step {step}"
        rows.append(["greedy tokens", f"{greedy['agreement']:.1%}", f"{greedy['new_tokens']} new tokens; {first}"])
    rows += [[name, _fmt(value, ".4g"), "registry_ab_metrics hook"] for name, value in n["extra"].items()]
    return ["measure", "value", "detail"], rows


def _layer_table(n: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for row in n["layers"]:
        status = "ok" if row["within"] else "over"
        if row["index"] == n["first_divergent_layer"]:
            status = "DIVERGES"
        rows.append(
            [str(row["index"]), row["name"], _fmt(row["max_abs"]), _fmt(row["max_rel"]), _fmt(row["mean_rel"]), status]
        )
    return ["layer", "hidden states", "max abs", "max rel", "mean rel", "within tolerance"], rows


def _speed_table(speed: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = []
    for name, m in speed["metrics"].items():
        unit, scale = ("ms", 1e3) if m["unit"] == "s" else (m["unit"], 1.0)
        spec = ".1f"

        def show(s: dict[str, Any], scale: float = scale, spec: str = spec) -> str:
            return f"{s['median'] * scale:{spec}} (IQR {s['iqr'] * scale:{spec}})"

        low, high = m["speedup_ci"]
        rows.append(
            [name, unit, show(m["a"]), show(m["b"]), f"{m['speedup']:.2f}x", f"{low:.2f}-{high:.2f}", m["faster"]]
        )
    return ["metric", "unit", "A median", "B median", "speedup B/A", f"{CONFIDENCE:.0%} CI", "faster"], rows


def _memory_table(memory: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    from registry.console import human_bytes

    columns = ("weights_bytes", "run_peak_bytes", "retained_bytes", "peak_bytes")
    rows = [[label.upper(), *(human_bytes(memory[label][c]) for c in columns)] for label in ("a", "b")]
    rows.append(["shared", human_bytes(memory["shared_weight_bytes"]), "", "", ""])
    return ["variant", "weights", "run peak", "kept after run", "peak"], rows


def _plot_layers(axis: Any, numerics: dict[str, Any], verdict: Verdict) -> None:
    layers = numerics["layers"]
    if not layers:
        axis.text(0.5, 0.5, numerics.get("layers_skipped", "no layers"), ha="center", va="center")
        axis.set_axis_off()
        return
    floor = verdict.tolerance * 1e-6  # a log axis has no zero: exact agreement is drawn at this floor
    index = [row["index"] for row in layers]
    axis.semilogy(index, [max(row["max_rel"], floor) for row in layers], "o-", label="max rel")
    axis.semilogy(index, [max(row["mean_rel"], floor) for row in layers], "s--", label="mean rel")
    axis.axhline(verdict.tolerance, color="red", linestyle=":", label=f"tolerance {verdict.tolerance:.0e}")
    if verdict.first_divergent_layer is not None:
        axis.axvline(verdict.first_divergent_layer, color="red", alpha=0.3, label="first divergent layer")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_xlabel("layer (0: embeddings, i: output of block i)")
    axis.set_ylabel("relative difference B vs A")
    axis.set_title("Per-layer difference")
    axis.legend(fontsize=7)


def _plot_timings(axis: Any, name: str, metric: dict[str, Any], label_a: str, label_b: str) -> None:
    scale, unit = (1e3, "ms") if metric["unit"] == "s" else (1.0, metric["unit"])
    samples = [[v * scale for v in metric[k]["samples"]] for k in ("a", "b")]
    axis.boxplot(samples, widths=0.5)
    for i, values in enumerate(samples, 1):
        axis.plot([i] * len(values), values, "o", alpha=0.5)
    axis.set_xticks([1, 2], [label_a, label_b], fontsize=7)
    axis.set_ylabel(unit)
    axis.set_title(f"{name}: {metric['speedup']:.2f}x (B vs A)")
