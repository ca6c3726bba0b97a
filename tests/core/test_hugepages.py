"""registry.hugepages: large CPU weights on memory advised for transparent huge pages."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import registry
from registry import checkpoints, hugepages

needs_huge_pages = pytest.mark.skipif(
    not hugepages.available(), reason=f"transparent huge pages here: {hugepages.mode()}"
)
BIG = hugepages.MIN_BYTES // 4  # float32 values in a tensor just large enough to be moved


def _smaps_entry(address: int) -> str:
    """The /proc/self/smaps block of the mapping that holds ``address``."""
    block: list[str] = []
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                if inside:
                    break
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
                block = []
            if inside:
                block.append(line)
    return "".join(block)


def test_the_switch_turns_it_off_and_says_so(monkeypatch):
    monkeypatch.setenv("REGISTRY_HUGE_PAGES", "0")
    assert hugepages.mode() == "turned off by REGISTRY_HUGE_PAGES=0" and not hugepages.available()
    with pytest.raises(RuntimeError, match="REGISTRY_HUGE_PAGES=0"):
        hugepages.empty((4,), torch.float32)
    layer = nn.Linear(1024, 1024)
    before = layer.weight.data_ptr()
    placement = hugepages.place(layer)
    assert placement.moved == 0 and layer.weight.data_ptr() == before
    assert placement.as_dict() == {"huge_pages": "not used: transparent huge pages turned off by REGISTRY_HUGE_PAGES=0"}
    model = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    assert "REGISTRY_HUGE_PAGES=0" in model.manifest["memory"]["huge_pages"]


@needs_huge_pages
def test_empty_is_aligned_and_advised_for_huge_pages():
    t = hugepages.empty((3, BIG), torch.bfloat16)
    assert t.shape == (3, BIG) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    entry = _smaps_entry(t.data_ptr())
    assert re.search(r"THPeligible:\s+1", entry), entry
    assert " hg" in entry.split("VmFlags:")[1], entry  # madvise(MADV_HUGEPAGE) recorded on the mapping
    t.fill_(2)  # usable memory, not a read-only mapping
    assert float(t.float().sum()) == 6 * BIG


@needs_huge_pages
def test_place_moves_large_tensors_keeps_their_values_and_their_ties():
    torch.manual_seed(0)
    model = nn.Module()
    model.embedding = nn.Embedding(BIG // 64, 64)  # exactly MIN_BYTES
    model.head = nn.Linear(64, BIG // 64, bias=False)
    model.head.weight = model.embedding.weight  # tied, as a language-model head
    model.small = nn.Linear(64, 64)
    table = torch.randn(BIG + 16)
    model.a, model.b = nn.Module(), nn.Module()
    model.a.register_buffer("table", table)
    model.b.register_buffer("table", table)  # one buffer held by two modules
    weight, small = model.embedding.weight.detach().clone(), model.small.weight.data_ptr()
    parameter = model.embedding.weight
    placement = hugepages.place(model)
    assert placement.moved == 2 and placement.bytes == hugepages.MIN_BYTES + (BIG + 16) * 4
    assert model.embedding.weight is parameter and model.head.weight is parameter  # same Parameter, still tied
    assert parameter.data_ptr() % hugepages.HUGE_PAGE == 0 and torch.equal(parameter, weight)
    assert model.a.table is model.b.table and torch.equal(model.a.table, table)
    assert model.a.table.data_ptr() % hugepages.HUGE_PAGE == 0
    assert model.small.weight.data_ptr() == small  # below MIN_BYTES: left where it was


@needs_huge_pages
def test_built_and_loaded_models_hold_their_large_weights_on_huge_pages(tmp_path, monkeypatch):
    model = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    large = [p for p in model.parameters() if p.numel() * p.element_size() >= hugepages.MIN_BYTES]
    assert large and all(p.data_ptr() % hugepages.HUGE_PAGE == 0 for p in large)
    assert len(large) == 1  # the embedding, which the head shares
    assert model.manifest["memory"] == {"huge_pages": f"1 tensor, {20000 * 64 * 4 / 2**20:.0f} MiB, advised"}
    model.save_pretrained(tmp_path)
    loaded = registry.from_pretrained(tmp_path)
    monkeypatch.setenv("REGISTRY_HUGE_PAGES", "0")
    plain = registry.from_pretrained(tmp_path)
    for (name, got), (_, expected) in zip(loaded.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(got, expected), name
        if got.numel() * got.element_size() >= hugepages.MIN_BYTES:
            assert got.data_ptr() % hugepages.HUGE_PAGE == 0, name
    assert loaded.manifest["memory"]["huge_pages"].startswith("1 tensor,")
    assert plain.manifest["memory"]["huge_pages"].startswith("not used")


@needs_huge_pages
def test_a_checkpoint_converted_on_loading_reads_the_same_numbers(tmp_path, monkeypatch):
    registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=40000).save_pretrained(tmp_path)
    loaded = registry.from_pretrained(tmp_path, dtype="bfloat16")  # float32 on disk: read in slices, converted
    monkeypatch.setenv("REGISTRY_HUGE_PAGES", "0")
    plain = registry.from_pretrained(tmp_path, dtype="bfloat16")
    assert loaded.manifest["memory"]["huge_pages"].startswith("1 tensor,")
    for (name, got), (_, expected) in zip(loaded.state_dict().items(), plain.state_dict().items(), strict=True):
        assert got.dtype == torch.bfloat16 and torch.equal(got, expected), name


@needs_huge_pages
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # read in place, and read converted in slices
def test_a_tensor_cut_short_is_a_clear_error(tmp_path, monkeypatch, dtype):
    registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=40000).save_pretrained(tmp_path)
    real = checkpoints._header

    def cut(path):  # as if the file ended inside the embedding: its offsets run past the end
        table, start = real(path)
        name = "transformer.word_embeddings.weight"
        begin, end = table[name]["data_offsets"]
        size = path.stat().st_size - start
        return {
            **table,
            name: {**table[name], "data_offsets": [size - (end - begin) // 2, size + (end - begin) // 2]},
        }, start

    monkeypatch.setattr(checkpoints, "_header", cut)
    with pytest.raises(registry.errors.CheckpointError, match="word_embeddings.weight.*bytes expected"):
        registry.from_pretrained(tmp_path, dtype=dtype)


@needs_huge_pages
def test_a_built_model_initialises_the_weights_it_placed(monkeypatch):
    """Placed before initialisation, not after: the same seed gives the same weights as without huge pages."""
    torch.manual_seed(0)
    placed = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    monkeypatch.setenv("REGISTRY_HUGE_PAGES", "0")
    torch.manual_seed(0)
    plain = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    for (name, got), (_, expected) in zip(placed.state_dict().items(), plain.state_dict().items(), strict=True):
        assert torch.equal(got, expected), name
    embedding = placed.state_dict()["transformer.word_embeddings.weight"]
    assert embedding.data_ptr() % hugepages.HUGE_PAGE == 0 and float(embedding.std()) > 0.01  # initialised
    assert embedding.untyped_storage().nbytes() == embedding.numel() * embedding.element_size()


@needs_huge_pages
def test_memory_that_cannot_be_mapped_leaves_tensors_on_ordinary_pages_and_says_so(tmp_path, monkeypatch):
    """No memory for a huge-page mapping (the kernel may refuse one): the tensor stays where it is, the
    numbers are the same, and the manifest says how many stayed and why."""
    torch.manual_seed(0)
    plain = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    plain.save_pretrained(tmp_path)

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(hugepages.mmap, "mmap", refused)
    torch.manual_seed(0)
    built = registry.build("bloom-560m", n_layer=1, hidden_size=64, n_head=2, vocab_size=20000)
    loaded = registry.from_pretrained(tmp_path)
    for model in (built, loaded):
        entry = model.manifest["memory"]["huge_pages"]
        assert entry.startswith("0 tensors, 0 MiB, advised; 1 tensor on ordinary pages:"), entry
        assert "Cannot allocate memory" in entry
        for (name, got), expected in zip(model.state_dict().items(), plain.state_dict().values(), strict=True):
            assert torch.equal(got, expected), name
    layer = nn.Linear(1024, 1024)
    placement = hugepages.place(layer)
    assert (placement.moved, placement.declined) == (0, 1)
