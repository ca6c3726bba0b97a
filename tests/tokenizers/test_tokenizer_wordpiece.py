"""wordpiece against the reference: transformers' fast BERT tokenizer and its Python BertTokenizer."""

from __future__ import annotations

import json
import logging
import shutil
import unicodedata

import pytest

import registry
from plugins.tokenizers.wordpiece import wordpiece

transformers = pytest.importorskip("transformers")

# the Python tokenizer returns token types only when asked (transformers 5) and has no offsets
PYTHON_OPTIONS = {"return_token_type_ids": True, "return_attention_mask": True}
FAST_OPTIONS = {"return_offsets_mapping": True, "return_special_tokens_mask": True}


@pytest.fixture(scope="module")
def ours(bert_dir):
    return registry.tokenizer(str(bert_dir))


@pytest.fixture(scope="module")
def fast(bert_dir):
    return transformers.AutoTokenizer.from_pretrained(str(bert_dir))


@pytest.fixture(scope="module")
def python(bert_dir, python_bert_class):
    return python_bert_class.from_pretrained(str(bert_dir))


def assert_matches_fast(ours, fast, parity, texts, pairs):
    """ids, token types, masks, offsets and decoded text equal the fast reference's, one at a time and batched."""
    for text in texts:
        mine, theirs = ours(text, **FAST_OPTIONS), fast(text, **FAST_OPTIONS)
        parity.assert_same(mine, theirs)
        assert ours.tokenize(text) == fast.tokenize(text), text
        for skip in (False, True):
            expected = fast.decode(theirs["input_ids"], skip_special_tokens=skip)
            assert ours.decode(mine["input_ids"], skip_special_tokens=skip) == expected, text
    for first, second in pairs:
        parity.assert_same(ours(first, second, **FAST_OPTIONS), fast(first, second, **FAST_OPTIONS))
    firsts, seconds = (list(side) for side in zip(*pairs, strict=True))
    options = {"padding": True, "return_tensors": "pt", **FAST_OPTIONS}
    mine, theirs = ours(firsts, seconds, **options), fast(firsts, seconds, **options)
    parity.assert_same(mine, theirs)
    assert ours.batch_decode(mine["input_ids"]) == fast.batch_decode(theirs["input_ids"])
    parity.assert_same(ours(texts, padding=True, return_tensors="pt"), fast(texts, padding=True, return_tensors="pt"))


def assert_matches_python(ours, python, parity, texts, pairs):
    """ids, token types, masks and (cleaned-up) decoded text equal the Python BertTokenizer's."""
    strips_accents = ours.do_lower_case if ours.strip_accents is None else ours.strip_accents
    for text in texts:
        if not strips_accents and unicodedata.normalize("NFC", text) != text:
            continue  # the Python tokenizer composes "e" + U+0301 into "é" first; the fast one (and we) do not
        mine, theirs = ours(text, **PYTHON_OPTIONS), python(text, **PYTHON_OPTIONS)
        parity.assert_same(mine, theirs)
        for skip in (False, True):
            # the Python tokenizer joins tokens with spaces; compare with the same clean-up on both sides
            expected = python.decode(theirs["input_ids"], skip_special_tokens=skip, clean_up_tokenization_spaces=True)
            got = ours.decode(mine["input_ids"], skip_special_tokens=skip, clean_up_tokenization_spaces=True)
            assert got == expected, text
    for first, second in pairs:
        if second:  # a single call with an empty pair: the fast reference drops it, the Python one keeps it
            parity.assert_same(ours(first, second, **PYTHON_OPTIONS), python(first, second, **PYTHON_OPTIONS))
    firsts, seconds = (list(side) for side in zip(*pairs, strict=True))  # in a batch both keep empty pairs
    options = {"padding": True, **PYTHON_OPTIONS}
    parity.assert_same(ours(firsts, seconds, **options), python(firsts, seconds, **options))


def test_auto_selection_picks_wordpiece(bert_dir, ours):
    assert type(ours.backend_tokenizer.model).__name__ == "WordPiece"
    assert wordpiece.can_load(str(bert_dir)) == []


def test_settings_and_special_tokens_match(ours, fast, python):
    for reference in (fast, python):
        for name in ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token", "bos_token", "eos_token"):
            assert getattr(ours, name) == getattr(reference, name), name
            assert getattr(ours, name + "_id") == getattr(reference, name + "_id"), name
        assert sorted(ours.all_special_ids) == sorted(reference.all_special_ids)
        assert ours.model_max_length == reference.model_max_length == 128
        assert ours.padding_side == reference.padding_side == "right"
        assert ours.vocab_size == reference.vocab_size
        assert ours.get_vocab() == reference.get_vocab()
    assert ours.all_special_tokens == fast.all_special_tokens
    assert ours.model_input_names == fast.model_input_names
    assert ours.do_lower_case is True


def test_corpus_matches_the_fast_reference(ours, fast, corpus, parity):
    assert_matches_fast(ours, fast, parity, corpus["texts"], corpus["pairs"])


def test_corpus_matches_the_python_reference(ours, python, corpus, parity):
    assert_matches_python(ours, python, parity, corpus["texts"], corpus["pairs"])


def test_pair_is_cls_a_sep_b_sep_with_token_types(ours, fast):
    encoding = ours("first part", "second")
    ids = ours.encode("first part", add_special_tokens=False), ours.encode("second", add_special_tokens=False)
    cls, sep = ours.cls_token_id, ours.sep_token_id
    assert encoding["input_ids"] == [cls, *ids[0], sep, *ids[1], sep]
    assert encoding["token_type_ids"] == [0] * (len(ids[0]) + 2) + [1] * (len(ids[1]) + 1)
    assert encoding["input_ids"] == fast("first part", "second")["input_ids"]


@pytest.mark.parametrize("truncation", [True, "only_first", "only_second"])
@pytest.mark.parametrize("padding", [True, "max_length"])
def test_pair_truncation_matches_both_references(ours, fast, python, corpus, parity, truncation, padding):
    firsts, seconds = (list(side) for side in zip(*corpus["pairs"], strict=True))
    options = {"truncation": truncation, "padding": padding, "max_length": 14, "return_token_type_ids": True}
    result = parity.same_or_both_fail(
        lambda: ours(firsts, seconds, **options), lambda: fast(firsts, seconds, **options)
    )
    if result is None:
        return  # the fast reference refuses (a sequence too short to cut); the Python one logs and goes on
    parity.assert_same(*result)
    # on a tie, longest_first cuts the first sequence in the fast reference, the second in the Python one:
    # we are the fast one there
    if truncation is not True:
        parity.assert_same(result[0], python(firsts, seconds, **options))


def test_long_text_warns_and_stays_whole_unless_truncation_asked(bert_dir, fast, python, long_text, parity, caplog):
    ours = wordpiece.load(str(bert_dir))  # a fresh one: the warning comes once per tokenizer
    with caplog.at_level(logging.WARNING):
        mine = ours(long_text)
    assert len(mine["input_ids"]) > 128
    parity.assert_same(mine, fast(long_text))
    parity.assert_same(ours(long_text, **PYTHON_OPTIONS), python(long_text, **PYTHON_OPTIONS))
    assert any("128" in record.getMessage() and "longer" in record.getMessage() for record in caplog.records)
    for options in ({"truncation": True}, {"truncation": True, "padding": "max_length"}, {"max_length": 20}):
        truncated = ours([long_text, "short"], **options)
        parity.assert_same(truncated, fast([long_text, "short"], **options))
        parity.assert_same(truncated, python([long_text, "short"], **options, **PYTHON_OPTIONS))
    assert len(ours(long_text, truncation=True)["input_ids"]) == 128


def test_overflow_and_word_ids_match(ours, fast, long_text, parity):
    options = {"truncation": True, "max_length": 24, "stride": 4, "return_overflowing_tokens": True, "padding": True}
    mine, theirs = ours([long_text, "a b"], **options), fast([long_text, "a b"], **options)
    parity.assert_same(mine, theirs)
    words = [["Hello", "wonderful", "world"], ["北京", "x"]]
    mine, theirs = (
        ours(words, is_split_into_words=True, padding=True),
        fast(words, is_split_into_words=True, padding=True),
    )
    parity.assert_same(mine, theirs)
    assert mine.word_ids(0) == theirs.word_ids(0)
    assert mine.tokens(1) == theirs.tokens(1)


def test_vocab_txt_alone_matches_both_references(cased_vocab_dir, python_bert_class, fast_bert_class, corpus, parity):
    vocab = cased_vocab_dir / "vocab.txt"
    ours = registry.tokenizer(str(vocab))  # BERT's defaults: lowercase, [CLS] A [SEP] B [SEP]
    python = python_bert_class(str(vocab))
    fast = fast_bert_class.from_pretrained(str(cased_vocab_dir))
    assert_matches_fast(ours, fast, parity, corpus["texts"], corpus["pairs"])
    assert_matches_python(ours, python, parity, corpus["texts"], corpus["pairs"])


@pytest.mark.parametrize(
    "options",
    [
        {"do_lower_case": False},
        {"do_lower_case": True, "strip_accents": False},
        {"do_lower_case": False, "strip_accents": True},
        {"do_lower_case": False, "tokenize_chinese_chars": False},
        {"do_lower_case": True, "tokenize_chinese_chars": False},
    ],
    ids=lambda options: ",".join(f"{key}={value}" for key, value in options.items()),
)
def test_options_match_both_references(cased_vocab_dir, python_bert_class, fast_bert_class, corpus, parity, options):
    vocab = cased_vocab_dir / "vocab.txt"
    ours = wordpiece.load(str(vocab), **options)
    python = python_bert_class(str(vocab), **options)
    fast = fast_bert_class.from_pretrained(str(cased_vocab_dir), **options)
    assert_matches_fast(ours, fast, parity, corpus["texts"], corpus["pairs"])
    assert_matches_python(ours, python, parity, corpus["texts"], corpus["pairs"])


def test_options_from_tokenizer_config(cased_vocab_dir, tmp_path, python_bert_class, corpus, parity):
    shutil.copy(cased_vocab_dir / "vocab.txt", tmp_path / "vocab.txt")
    config = {"do_lower_case": False, "tokenize_chinese_chars": False, "model_max_length": 64}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours = registry.tokenizer(str(tmp_path))
    python = python_bert_class.from_pretrained(str(tmp_path))
    assert (ours.do_lower_case, ours.tokenize_chinese_chars, ours.model_max_length) == (False, False, 64)
    assert_matches_python(ours, python, parity, corpus["texts"], corpus["pairs"])


def test_never_split_matches_the_python_reference(bert_dir, python_bert_class, parity):
    never_split = ["[unused1]", "FooBar"]  # in the vocabulary; split and lowercased without never_split
    ours = wordpiece.load(str(bert_dir / "vocab.txt"), never_split=never_split)
    python = python_bert_class(str(bert_dir / "vocab.txt"), never_split=never_split)
    plain = python_bert_class(str(bert_dir / "vocab.txt"))
    texts = ["see [unused1] here", "FooBar and foobar", "[unused1]", "a\tFooBar\n[unused1] b", "x FooBar y."]
    for text in texts:
        parity.assert_same(ours(text, **PYTHON_OPTIONS), python(text, **PYTHON_OPTIONS))
        assert ours.tokenize(text) == python.tokenize(text), text
    assert python.tokenize("see [unused1] here") != plain.tokenize("see [unused1] here")  # the option matters
    # the documented difference: next to punctuation, the token stays whole here (the Python one splits it)
    assert ours.tokenize("Hello, FooBar!")[2] == "FooBar"


def test_never_split_token_outside_the_vocabulary_is_refused(bert_dir):
    with pytest.raises(registry.errors.TokenizerError, match="never_split"):
        wordpiece.load(str(bert_dir), never_split=["NotInTheVocab"])


def test_saved_tokenizer_loads_in_all_three(cased_vocab_dir, tmp_path, python_bert_class, corpus, parity):
    ours = wordpiece.load(str(cased_vocab_dir / "vocab.txt"), do_lower_case=False)
    written = ours.save_pretrained(tmp_path)
    assert {path.rsplit("/", 1)[-1] for path in written} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    }
    assert (tmp_path / "vocab.txt").read_text(encoding="utf-8") == (cased_vocab_dir / "vocab.txt").read_text(
        encoding="utf-8"
    )
    options = {"padding": True, "return_offsets_mapping": True, **PYTHON_OPTIONS}
    expected = ours(corpus["texts"], **options)
    parity.assert_same(registry.tokenizer(str(tmp_path))(corpus["texts"], **options), expected)
    parity.assert_same(transformers.AutoTokenizer.from_pretrained(str(tmp_path))(corpus["texts"], **options), expected)
    assert_matches_python(
        ours, python_bert_class.from_pretrained(str(tmp_path)), parity, corpus["texts"], corpus["pairs"]
    )


def test_real_minilm_tokenizer_matches_both_references(minilm_dir, python_bert_class, corpus, long_text, parity):
    ours = registry.tokenizer(str(minilm_dir))
    fast = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    python = python_bert_class.from_pretrained(str(minilm_dir))
    assert ours.model_max_length == fast.model_max_length == 512
    assert_matches_fast(ours, fast, parity, corpus["texts"], corpus["pairs"])
    assert_matches_python(ours, python, parity, corpus["texts"], corpus["pairs"])
    for options in ({}, {"truncation": True}, {"padding": "max_length", "truncation": True}):
        parity.assert_same(ours([long_text, ""], **options), fast([long_text, ""], **options))
    vocab_only = registry.tokenizer(str(minilm_dir / "vocab.txt"))  # the same tokenizer from its vocab.txt
    parity.assert_same(vocab_only(corpus["texts"], padding=True), ours(corpus["texts"], padding=True))
