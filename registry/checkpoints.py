"""Checkpoints in the reference's layout: config.json + safetensors (single file or sharded with an index).

Loading builds the model on the meta device and assigns each tensor as it is read, converted to the
requested dtype: the weights are never held twice. Strict by default: missing or mis-shaped backbone
tensors are an error that lists them; head tensors absent from a checkpoint (a head loaded from a
base checkpoint) are initialised and reported, as the reference does; tensors of another head are
dropped and reported.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from registry import hugepages
from registry.discovery import default_catalog
from registry.errors import CheckpointError, InvalidSpecError
from registry.interfaces import Family
from registry.spec import ModelSpec, TaskSpec

log = logging.getLogger(__name__)

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_TASK_KEYS = ("problem_type", "classifier_dropout")


# -- config.json <-> spec ---------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"'{folder}' has no {CONFIG}; a checkpoint folder needs config.json and safetensors")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or "model_type" not in data:
        raise CheckpointError(f"{path} has no 'model_type'; cannot tell which family it is")
    return data


def spec_data_from_config(reference: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's config.json -> spec data (family, config, task, dtype, head)."""
    family_name = str(reference["model_type"])
    family = default_catalog().get("family", family_name)
    assert isinstance(family, Family)
    data: dict[str, Any] = {"family": family_name, "config": family.config_from_reference(reference)}
    task: dict[str, Any] = {k: reference[k] for k in _TASK_KEYS if reference.get(k) is not None}
    id2label = reference.get("id2label")
    if id2label:
        task["id2label"] = {int(k): v for k, v in id2label.items()}
        task["num_labels"] = len(id2label)
    elif reference.get("num_labels"):
        task["num_labels"] = reference["num_labels"]
    data["task"] = task
    dtype = reference.get("dtype") or reference.get("torch_dtype")
    if dtype in ("float32", "bfloat16", "float16"):
        data["dtype"] = dtype
    by_class = {cls: head for head, cls in family.architectures.items()}
    for architecture in reference.get("architectures") or []:
        if architecture in by_class:
            data["components"] = {"head": by_class[architecture]}
            break
    else:
        data["components"] = {"head": "base"}
    data["components"].update(family.components_from_reference(reference))
    return data


def config_from_spec(spec: ModelSpec, family: Family) -> dict[str, Any]:
    head = spec.components.head
    out = family.config_to_reference(spec.config)
    out.update(family.components_to_reference(spec.components))
    if head in family.architectures:
        out["architectures"] = [family.architectures[head]]
    task: TaskSpec = spec.task
    labels = task.id2label or {i: f"LABEL_{i}" for i in range(task.num_labels)}
    out["id2label"] = {str(k): v for k, v in labels.items()}
    out["label2id"] = {v: k for k, v in labels.items()}
    for key in _TASK_KEYS:
        if getattr(task, key) is not None:
            out[key] = getattr(task, key)
    out["dtype"] = spec.dtype
    return out


# -- key layout ---------------------------------------------------------------------------------


def reference_key(model: Any, key: str) -> str:
    """Our state-dict key -> the reference's (head modules sit at the top level there)."""
    return model.family.reference_key(key.removeprefix("head."))


def _candidates(model: Any, key: str, renames: list[tuple[str, str]]) -> list[str]:
    ref = reference_key(model, key)
    names = [ref]
    prefix = model.base_prefix + "."
    if ref.startswith(prefix):
        names.append(ref[len(prefix) :])  # a base-model checkpoint has no prefix
    for old, new in renames:
        names += [n[: -len(new)] + old for n in list(names) if n.endswith(new)]
    return names


# -- reading ------------------------------------------------------------------------------------


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    single = folder / SINGLE
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (
        f" (found {', '.join(others)}: pickled weights are not loaded; convert them to safetensors)" if others else ""
    )
    raise CheckpointError(f"'{folder}' has neither {SINGLE} nor {INDEX}{hint}")


READ_CHUNK = 8 << 20  # bytes read from a checkpoint per copy into huge-page memory (a small transient)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's tensor table and the offset where its data starts."""
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        table = json.loads(f.read(length))
    table.pop("__metadata__", None)
    return table, 8 + length


class _Tensors:
    """Every tensor name in a checkpoint, read lazily from memory-mapped safetensors files."""

    def __init__(self, files: list[Path], stack: ExitStack):
        from safetensors import safe_open

        self.where: dict[str, Any] = {}
        self.file_of: dict[str, Path] = {}
        self.headers: dict[Path, tuple[dict[str, Any], int]] = {}  # read on first use
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                names = list(handle.keys())
            except Exception as error:  # safetensors raises its own error type for corrupt headers
                raise CheckpointError(
                    f"cannot read '{path}': {error} (truncated or not a safetensors file?)"
                ) from error
            for name in names:
                self.where[name] = handle
                self.file_of[name] = path

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name].get_slice(name).get_shape())

    def get_on_huge_pages(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor converted to ``dtype`` on huge-page memory (:mod:`registry.hugepages`), read from
        its file with plain reads, READ_CHUNK bytes at a time. Not through the file's memory mapping:
        every page read through it would stay mapped, and count, until loading ends (twice the weights
        at the peak)."""
        path = self.file_of[name]
        try:
            if path not in self.headers:
                self.headers[path] = _header(path)
            entry, data_start = self.headers[path]
            stored = _SAFETENSORS_DTYPES.get(entry[name]["dtype"])
            begin, end = (int(offset) for offset in entry[name]["data_offsets"])
        except (OSError, ValueError, KeyError, TypeError) as error:  # the file changed since it was opened
            raise CheckpointError(f"cannot read the header of '{path}' for tensor '{name}': {error!r}") from error
        out = hugepages.empty(self.shape(name), dtype)  # OSError: the caller reads it the ordinary way
        if stored is None:  # a dtype this reader does not map: read through safetensors instead
            out.copy_(self.get(name))
            return out
        size = stored.itemsize
        if end - begin != out.numel() * size:  # safetensors checked the header; the file may have changed since
            raise CheckpointError(
                f"tensor '{name}' in '{path}' holds {end - begin} bytes; its shape {list(out.shape)} of "
                f"{entry[name]['dtype']} needs {out.numel() * size}"
            )
        flat = out.view(-1)
        try:
            with open(path, "rb") as f:
                f.seek(data_start + begin)
                if stored == dtype:  # straight into the tensor's memory
                    view = (ctypes.c_char * (end - begin)).from_address(out.data_ptr())
                    if f.readinto(view) != end - begin:
                        raise OSError(f"{end - begin} bytes expected")
                else:
                    done, chunk = 0, bytearray(READ_CHUNK // size * size)
                    while done < end - begin:
                        got = f.readinto(memoryview(chunk)[: min(len(chunk), end - begin - done)])
                        if not got or got % size:
                            raise OSError(f"{end - begin} bytes expected, the file ends after {done + got}")
                        values = torch.frombuffer(chunk, dtype=stored, count=got // size)
                        flat[done // size : (done + got) // size].copy_(values)
                        done += got
        except OSError as error:
            raise CheckpointError(f"cannot read tensor '{name}' from '{path}': {error} (truncated file?)") from error
        return out

    def get(self, name: str) -> Tensor:
        try:
            return self.where[name].get_tensor(name)
        except Exception as error:
            raise CheckpointError(
                f"cannot read tensor '{name}' from '{self.file_of[name]}': {error} (truncated file?)"
            ) from error


def _set_tensor(model: nn.Module, key: str, value: Tensor) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=bool(old is not None and old.requires_grad))
    else:
        module._buffers[attr] = value


def load_weights(model: Any, folder: Path, *, device: str, strict: bool = True) -> dict[str, Any]:
    """Fill a meta-device model from the checkpoint in ``folder``; return what was loaded, initialised
    and left unused, and under ``memory`` where the large tensors went (:mod:`registry.hugepages`).

    Raises:
        CheckpointError: unreadable files, missing or mis-shaped backbone tensors, or (``strict``)
            backbone tensors the model does not have.
    """
    family: Family = model.family
    renames = list(family.legacy_renames())
    dtype = getattr(torch, model.spec.dtype)
    expected = dict(model.state_dict(keep_vars=True))
    report: dict[str, Any] = {"files": [], "loaded": 0, "initialized": [], "unused": [], "tied": []}
    with ExitStack() as stack:
        files = checkpoint_files(folder)
        report["files"] = [f.name for f in files]
        tensors = _Tensors(files, stack)
        plan: dict[str, str] = {}
        for key in expected:
            for name in _candidates(model, key, renames):
                if name in tensors.where:
                    plan[key] = name
                    break
        missing = [k for k in expected if k not in plan]
        prefix = model.base_prefix + "."
        optional = _matcher(family.optional_reference_keys(), prefix)
        missing_backbone = [
            reference_key(model, k)
            for k in missing
            if not k.startswith("head.") and not optional(reference_key(model, k))
        ]
        if missing_backbone:
            raise CheckpointError(
                f"checkpoint '{folder}' lacks {len(missing_backbone)} tensor(s) the model needs: "
                + ", ".join(missing_backbone[:20])
                + (" ..." if len(missing_backbone) > 20 else "")
            )
        wrong = []
        for key, name in plan.items():
            have, want = tensors.shape(name), tuple(expected[key].shape)
            if have != want:
                wrong.append(f"{name}: checkpoint {list(have)} vs model {list(want)}")
        if wrong:
            raise CheckpointError(f"checkpoint '{folder}' has tensors of the wrong shape: " + "; ".join(wrong))
        used = set(plan.values())
        tied = _tied_names(model)
        unused = sorted(n for n in tensors.where if n not in used)
        report["tied"] = [n for n in unused if n in tied]
        unused = [n for n in unused if n not in tied]
        backbone_names = {reference_key(model, k).removeprefix(prefix) for k in expected if not k.startswith("head.")}
        ignorable = _matcher(family.unused_reference_keys(), prefix)
        stray = [
            n for n in unused if (n.removeprefix(prefix) in backbone_names or n.startswith(prefix)) and not ignorable(n)
        ]
        if stray and strict:
            raise CheckpointError(f"checkpoint '{folder}' has tensors the model does not: {', '.join(stray[:20])}")
        report["unused"] = unused
        why_not = hugepages.why_not(device)
        if not why_not and sys.byteorder != "little":  # the file's bytes are read as they lie (little-endian)
            why_not = "not used: a big-endian machine"
        huge = not why_not
        placement = hugepages.Placement(reason=why_not)
        element = dtype.itemsize
        for key, name in plan.items():
            shape = tensors.shape(name)
            value = None
            if huge and shape and math.prod(shape) * element >= hugepages.MIN_BYTES:
                try:
                    value = tensors.get_on_huge_pages(name, dtype)
                    placement.moved += 1
                    placement.bytes += value.numel() * element
                except OSError as error:  # no memory to map (a file error is a CheckpointError)
                    placement.decline(error)
            if value is None:
                read = tensors.get(name)
                value = read.to(device=device, dtype=dtype)
                if huge and value.untyped_storage().data_ptr() == read.untyped_storage().data_ptr():
                    # a view of the file's mapping would keep the whole mapping, and the pages the copies
                    # above read from it, resident: a small copy lets it go when loading ends
                    value = value.clone()
            _set_tensor(model, key, value)
            report["loaded"] += 1
        report["memory"] = placement.as_dict()
    if missing:
        from registry.build import initialize

        modules = {k.rpartition(".")[0] for k in missing}
        for key in missing:
            _set_tensor(model, key, torch.empty(expected[key].shape, dtype=dtype, device=device))
        initialize(model, family, model.spec.config, only=modules)
        report["initialized"] = [reference_key(model, k) for k in missing]
        log.warning("initialised weights not in the checkpoint: %s", ", ".join(report["initialized"]))
    if report["unused"]:
        log.info("checkpoint tensors not used by this head: %s", ", ".join(report["unused"]))
    leftover = [n for n, t in model.state_dict().items() if t.device.type == "meta"]
    if leftover:
        raise CheckpointError(f"tensors still unset after loading: {', '.join(leftover)}")
    return report


def _tied_names(model: Any) -> set[str]:
    """Reference keys of projections tied to the input embeddings (saved once, under the embedding)."""
    names = set()
    for name, module in model.head.named_modules():
        if hasattr(module, "_embedding"):
            names.add(model.family.reference_key(f"{name}.weight"))
    return names


def _matcher(patterns: Any, prefix: str) -> Any:
    """A predicate: does a reference key (with or without ``prefix``) match one of ``patterns``?"""
    compiled = [re.compile(p) for p in patterns]
    return lambda name: any(c.search(name.removeprefix(prefix)) for c in compiled)


# -- public entry points --------------------------------------------------------------------------


def from_pretrained(path: str | os.PathLike[str], **overrides: Any) -> Any:
    """Load a checkpoint folder in the reference's layout.

    Args:
        path: folder with config.json and model.safetensors (or an index and shards).
        overrides: as for :func:`registry.build`: slots (``attention="sdpa"``, ``head=...``), spec
            fields, ``dtype``, ``device``. The head defaults to config.json's ``architectures``.

    Raises:
        CheckpointError: missing or unreadable files, tensors missing or of the wrong shape.

    Example:
        >>> model = registry.from_pretrained("ckpt/", attention="sdpa", dtype="bfloat16")
    """
    from registry.build import assemble, resolve_spec, split_build_options
    from registry.hooks import manager

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder '{folder}' does not exist")
    data = spec_data_from_config(read_config(folder))
    data["name"] = folder.name
    spec_overrides, device = split_build_options(overrides)
    spec = resolve_spec(data, spec_overrides)
    model = assemble(spec, device=device, init=False)
    loaded = load_weights(model, folder, device=device)
    model.manifest["memory"] = loaded.pop("memory")
    model.manifest["checkpoint"] = {"path": str(folder), **loaded}
    _attach_tokenizer(model, folder)
    manager().hook.registry_build_finished(model=model, manifest=model.manifest)
    return model


def _attach_tokenizer(model: Any, folder: Path) -> None:
    choice = model.manifest["components"].get("tokenizer", {})
    name = choice.get("chosen")
    if not name:
        return
    plugin = default_catalog().get("tokenizer", name)
    reasons = plugin.can_load(str(folder))  # type: ignore[attr-defined]
    if reasons:
        model.manifest["tokenizer"] = {"loaded": False, "reason": "; ".join(reasons)}
        return
    model.tokenizer = plugin.load(str(folder))  # type: ignore[attr-defined]
    model.manifest["tokenizer"] = {"loaded": True, "plugin": name}


def save_pretrained(model: Any, path: str | os.PathLike[str], *, max_shard_bytes: int | None = None) -> None:
    """Write config.json and safetensors weights in the reference's layout.

    Args:
        max_shard_bytes: split into ``model-0000i-of-0000n.safetensors`` shards with an index when the
            weights exceed this size.
    """
    from safetensors.torch import save_file

    if model.device.type == "meta":
        raise CheckpointError("a model on the meta device has no weights to save; build it on a real device")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    family: Family = model.family
    config = config_from_spec(model.spec, family)
    (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {reference_key(model, k): v.detach().contiguous() for k, v in model.state_dict().items()}
    shards = list(_shards(tensors, max_shard_bytes))
    for stale in [folder / SINGLE, folder / INDEX, *folder.glob("model-*-of-*.safetensors")]:
        if stale.exists():
            stale.unlink()
    if len(shards) == 1:
        save_file(shards[0], str(folder / SINGLE), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _shards(tensors: dict[str, Tensor], limit: int | None) -> Iterator[dict[str, Tensor]]:
    if limit is None:
        yield tensors
        return
    if limit <= 0:
        raise InvalidSpecError(f"max_shard_bytes must be positive, got {limit}")
    shard: dict[str, Tensor] = {}
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
    if shard:
        yield shard
