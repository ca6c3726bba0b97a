"""Large CPU weights on transparent huge pages (2 MiB) instead of 4 KiB pages.

A decode step reads every weight once, so its speed is the speed at which memory streams. On the
2-core machine of docs/benchmarks.md, the same 512 MB read at 21-23 GB/s or at 29-30 depending on the
pages behind it: the first gigabyte a process allocates came in 4 KiB pages scattered over physical
memory, and streamed a quarter slower than later allocations, or than any allocation advised for huge
pages. Which weights were slow depended on allocation order (a model built first lost to one loaded
after it). PyTorch's allocator advises huge pages only under ``THP_MEM_ALLOC_ENABLE=1``, read once at
startup; this module does it for the weights alone.

:func:`empty` returns an uninitialised CPU tensor on fresh anonymous memory, 2 MiB aligned and advised
for huge pages (``madvise(MADV_HUGEPAGE)``) before anything touches it: its pages are allocated as the
tensor is first written, and only then. :func:`place` moves a model's large parameters and buffers there
(``registry.build`` and ``registry.from_pretrained`` call it for CPU models; the manifest's ``memory``
entry records what it did). Nothing is moved, and the report says why, where the kernel does not offer
transparent huge pages for advised memory (``/sys/kernel/mm/transparent_hugepage/enabled`` set to
``never``, or not Linux), for tensors below MIN_BYTES, or with ``REGISTRY_HUGE_PAGES=0``.
"""

from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HUGE_PAGE = 2 << 20
log = logging.getLogger(__name__)
MIN_BYTES = 4 << 20  # smaller tensors would waste most of a huge page (the tail is rounded up to one)
_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mode() -> str:
    """The kernel's transparent huge page setting ("always", "madvise" or "never"), or why it is unknown."""
    if os.environ.get("REGISTRY_HUGE_PAGES", "1") == "0":
        return "turned off by REGISTRY_HUGE_PAGES=0"
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return "not offered on this platform (no MADV_HUGEPAGE)"
    try:
        text = _SETTING.read_text()
    except OSError:
        return f"unknown ({_SETTING} is not readable)"
    if _disabled_for_this_process():
        return "disabled for this process (prctl PR_SET_THP_DISABLE)"
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else f"unknown ({_SETTING} reads {text.strip()!r})"


def _disabled_for_this_process() -> bool:
    """Whether this process may not have huge pages (some containers and services set PR_SET_THP_DISABLE)."""
    try:
        with open("/proc/self/status") as f:
            return any(line.split() == ["THP_enabled:", "0"] for line in f)
    except OSError:
        return False


def available() -> bool:
    """Whether advised memory gets huge pages here."""
    return mode() in ("always", "madvise")


def why_not(device: str | torch.device) -> str:
    """Why weights on ``device`` are not placed on huge pages ("" where they are), as the manifest says it."""
    kind = torch.device(device).type
    if kind != "cpu":
        return f"not used: the weights are on {kind}"
    return "" if available() else f"not used: transparent huge pages {mode()}"


def empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor on memory advised for huge pages (see the module's docstring).

    Raises:
        RuntimeError: huge pages are not available here (:func:`mode` says why).
        OSError: the memory could not be mapped or advised (out of memory, say).
    """
    if not available():
        raise RuntimeError(f"transparent huge pages are not available: {mode()}")
    numel = 1
    for size in shape:
        numel *= int(size)
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.empty(tuple(shape), dtype=dtype)
    length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE  # room to start on a 2 MiB boundary
    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(memory, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    memory.madvise(mmap.MADV_HUGEPAGE, start, length - start)
    # a storage of exactly these bytes (sizes and saved files count the tensor, not the mapping's slack),
    # which keeps the mapping alive
    data = torch.frombuffer(memory, dtype=torch.uint8, offset=start, count=nbytes)
    return data.view(dtype).view(tuple(shape))


@dataclass
class Placement:
    """What :func:`place` did: tensors moved and their bytes, or why none were; tensors left on
    ordinary pages because their memory could not be mapped or advised, and the first such error."""

    moved: int = 0
    bytes: int = 0
    reason: str = ""
    declined: int = 0
    error: str = ""

    def decline(self, error: OSError) -> None:
        """Record a tensor left where it was (the first error is kept, and logged once)."""
        if not self.declined:
            self.error = str(error)
            log.warning("huge pages: a tensor stays on ordinary pages (%s); its numbers are the same", error)
        self.declined += 1

    def as_dict(self) -> dict[str, object]:
        """The manifest's ``memory`` entry. Huge pages are advised, not promised: the kernel may still
        give 4 KiB pages where it finds no free 2 MiB (see AnonHugePages in /proc/self/smaps)."""
        if self.reason:
            return {"huge_pages": self.reason}
        tensors = "tensor" if self.moved == 1 else "tensors"
        entry = f"{self.moved} {tensors}, {self.bytes / 2**20:.0f} MiB, advised"
        if self.declined:
            left = "tensor" if self.declined == 1 else "tensors"
            entry += f"; {self.declined} {left} on ordinary pages: {self.error}"
        return {"huge_pages": entry}


def place(model: nn.Module, *, copy: bool = True) -> Placement:
    """Move every CPU parameter and buffer of at least MIN_BYTES onto huge-page memory, in place (the
    same ``nn.Parameter`` objects; tied weights stay tied).

    Args:
        model: any module; its tensors elsewhere than on the CPU, or smaller, are left where they are.
        copy: False leaves the new memory uninitialised and untouched (weights about to be initialised).

    A tensor whose new memory cannot be mapped or advised (out of memory, say) stays where it is; the
    placement counts it and keeps the error (:meth:`Placement.as_dict` shows both).

    Example:
        >>> hugepages.place(model).as_dict()
        {'huge_pages': '9 tensors, 1076 MiB, advised'}
    """
    reason = why_not("cpu")
    if reason:
        return Placement(reason=reason)
    report = Placement()
    # a buffer held by several modules is moved once, for all of them (the originals are held, so that
    # their ids stay theirs while this runs)
    replaced: dict[int, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        for module in model.modules():
            tables: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
            for table in tables:
                for attr, tensor in table.items():
                    if tensor is None or not worth_moving(tensor):
                        continue
                    if id(tensor) in replaced:
                        if not isinstance(tensor, nn.Parameter):
                            table[attr] = replaced[id(tensor)][1]
                        continue
                    try:
                        moved = empty(tensor.shape, tensor.dtype)
                    except OSError as error:
                        report.decline(error)
                        continue
                    if copy:
                        moved.copy_(tensor)
                    replaced[id(tensor)] = (tensor, moved)
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = moved  # every module holding this Parameter sees the new memory
                    else:
                        table[attr] = moved
                    report.moved += 1
                    report.bytes += moved.numel() * moved.element_size()
    return report


def worth_moving(tensor: Tensor) -> bool:
    """A contiguous CPU tensor of at least MIN_BYTES."""
    return (
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() >= MIN_BYTES
    )
