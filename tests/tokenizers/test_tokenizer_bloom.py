"""byte-level-bpe against the reference (transformers' fast tokenizer) on a BLOOM-format tokenizer."""

from __future__ import annotations

import logging
import shutil

import pytest

import registry
from plugins.tokenizers.byte_level_bpe import byte_level_bpe

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def ours(bloom_dir):
    return registry.tokenizer(str(bloom_dir))


@pytest.fixture(scope="module")
def reference(bloom_dir):
    return transformers.AutoTokenizer.from_pretrained(str(bloom_dir))


def test_auto_selection_picks_byte_level_bpe(bloom_dir, ours):
    assert type(ours.backend_tokenizer.model).__name__ == "BPE"
    assert byte_level_bpe.can_load(str(bloom_dir)) == []


def test_special_tokens_and_settings_match(ours, reference):
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(ours, name) == getattr(reference, name), name
        assert getattr(ours, name + "_id") == getattr(reference, name + "_id"), name
    assert [ours.unk_token_id, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id] == [0, 1, 2, 3]
    assert ours.all_special_tokens == reference.all_special_tokens
    assert ours.all_special_ids == reference.all_special_ids
    assert ours.padding_side == reference.padding_side == "left"
    assert ours.model_max_length == reference.model_max_length
    assert ours.vocab_size == reference.vocab_size
    assert len(ours) == len(reference)
    assert ours.get_vocab() == reference.get_vocab()
    assert ours.model_input_names == reference.model_input_names


def test_each_text_matches(ours, reference, corpus, parity):
    options = {"return_offsets_mapping": True, "return_special_tokens_mask": True, "return_length": True}
    for text in corpus["texts"]:
        mine, theirs = ours(text, **options), reference(text, **options)
        parity.assert_same(mine, theirs)
        assert ours.tokenize(text) == reference.tokenize(text), text
        assert ours.encode(text) == reference.encode(text), text
        for skip in (False, True):
            decoded = ours.decode(mine["input_ids"], skip_special_tokens=skip)
            assert decoded == reference.decode(theirs["input_ids"], skip_special_tokens=skip), text
        assert ours.decode(mine["input_ids"]) == text  # byte-level BPE loses nothing


def test_padded_batch_matches(ours, reference, corpus, parity):
    texts = corpus["texts"]
    mine = ours(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
    theirs = reference(texts, padding=True, return_tensors="pt", return_offsets_mapping=True)
    parity.assert_same(mine, theirs)
    assert mine["attention_mask"][:, 0].tolist() != [1] * len(texts)  # left padding happened
    for skip in (False, True):
        assert ours.batch_decode(mine["input_ids"], skip_special_tokens=skip) == reference.batch_decode(
            theirs["input_ids"], skip_special_tokens=skip
        )
    assert ours.decode(mine["input_ids"]) == reference.decode(theirs["input_ids"])  # a batch decodes to a list


def test_pairs_match(ours, reference, corpus, parity):
    firsts, seconds = zip(*corpus["pairs"], strict=True)
    options = {"padding": "longest", "return_offsets_mapping": True, "return_special_tokens_mask": True}
    parity.assert_same(ours(list(firsts), list(seconds), **options), reference(list(firsts), list(seconds), **options))
    for first, second in corpus["pairs"]:  # one pair at a time (an empty second counts as none, in both)
        parity.assert_same(ours(first, second), reference(first, second))
    parity.assert_same(ours(corpus["pairs"]), reference(corpus["pairs"]))  # a batch of (text, pair) rows


@pytest.mark.parametrize("truncation", [True, "longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("padding", [False, True, "max_length"])
@pytest.mark.parametrize("max_length", [5, 12])
def test_truncation_and_padding_match(ours, reference, corpus, parity, truncation, padding, max_length):
    firsts, seconds = (list(side) for side in zip(*corpus["pairs"], strict=True))
    options = {"truncation": truncation, "padding": padding, "max_length": max_length, "return_offsets_mapping": True}
    result = parity.same_or_both_fail(
        lambda: ours(firsts, seconds, **options), lambda: reference(firsts, seconds, **options)
    )
    if result is not None:
        parity.assert_same(*result)
    if truncation != "only_second":
        parity.assert_same(ours(corpus["texts"], **options), reference(corpus["texts"], **options))


def test_max_length_alone_truncates_and_options_match(ours, reference, corpus, parity):
    texts = corpus["texts"]
    for options in (
        {"max_length": 6},
        {"padding": "max_length", "max_length": 40, "truncation": True, "pad_to_multiple_of": 8},
        {"padding": True, "pad_to_multiple_of": 8},
        {"padding": True, "padding_side": "right"},
        {"padding": True, "return_token_type_ids": True, "return_attention_mask": False},
        {"add_special_tokens": False, "padding": True},
    ):
        parity.assert_same(ours(texts, **options), reference(texts, **options))


def test_overflowing_tokens_with_stride_match(ours, reference, long_text, parity):
    options = {"truncation": True, "max_length": 32, "stride": 8, "return_overflowing_tokens": True, "padding": True}
    parity.assert_same(ours([long_text, "short"], **options), reference([long_text, "short"], **options))


def test_pretokenized_words_match(ours, reference, parity):
    words = [["Hello", "world", "!"], ["北京", "欢迎", "你"], [""]]
    parity.assert_same(
        ours(words, is_split_into_words=True, padding=True), reference(words, is_split_into_words=True, padding=True)
    )


def test_tokens_and_ids_convert_as_reference(ours, reference):
    tokens = reference.tokenize("Hello world, 你好") + ["<pad>", "not-a-token-at-all"]
    assert ours.convert_tokens_to_ids(tokens) == reference.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<s>") == reference.convert_tokens_to_ids("<s>")
    ids = reference.encode("Hello world") + [0, 1, 2, 3]
    assert ours.convert_ids_to_tokens(ids) == reference.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == reference.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    assert ours.convert_tokens_to_string(tokens[:3]) == reference.convert_tokens_to_string(tokens[:3])


def test_long_text_warns_and_stays_whole_unless_truncation_asked(bloom_dir, long_text, parity, caplog):
    ours = byte_level_bpe.load(str(bloom_dir), model_max_length=64)
    reference = transformers.AutoTokenizer.from_pretrained(str(bloom_dir), model_max_length=64)
    with caplog.at_level(logging.WARNING):
        mine = ours(long_text)
    assert len(mine["input_ids"]) > 64
    parity.assert_same(mine, reference(long_text))
    assert any("64" in record.getMessage() and "longer" in record.getMessage() for record in caplog.records)
    truncated = ours(long_text, truncation=True)
    assert len(truncated["input_ids"]) == 64
    parity.assert_same(truncated, reference(long_text, truncation=True))


def test_add_prefix_space_spaces_the_first_word(bloom_dir, corpus, parity):
    ours = byte_level_bpe.load(str(bloom_dir), add_prefix_space=True)
    plain_reference = transformers.AutoTokenizer.from_pretrained(str(bloom_dir))
    assert ours.add_prefix_space is True
    # without punctuation (one piece per word), the flag means: as if the text started with a space
    for text in ["Hello world", "the quick brown fox", "北京欢迎你"]:
        assert ours.encode(text) == plain_reference.encode(" " + text), text
    # everywhere: as the reference's BLOOM tokenizer with the ByteLevel pre-tokenizer flag set
    reference = transformers.AutoTokenizer.from_pretrained(str(bloom_dir))
    reference.backend_tokenizer.pre_tokenizer[1].add_prefix_space = True
    options = {"padding": True, "return_offsets_mapping": True}
    parity.assert_same(ours(corpus["texts"], **options), reference(corpus["texts"], **options))
    words = [["Hello", "world"], ["a", "b", "c"]]
    parity.assert_same(
        ours(words, is_split_into_words=True, padding=True), reference(words, is_split_into_words=True, padding=True)
    )


def test_bare_tokenizer_json_gets_bloom_special_tokens(bloom_dir, tmp_path, corpus, parity):
    shutil.copy(bloom_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    ours = registry.tokenizer(str(tmp_path / "tokenizer.json"))
    assert (ours.unk_token, ours.bos_token, ours.eos_token, ours.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert ours.padding_side == "left"
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "tokenizer.json"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    options = {"padding": True, "return_offsets_mapping": True, "return_token_type_ids": False}
    parity.assert_same(ours(corpus["texts"], **options), reference(corpus["texts"], **options))


def test_saved_tokenizer_loads_in_both(ours, bloom_dir, tmp_path, corpus, parity):
    written = ours.save_pretrained(tmp_path / "saved")
    assert {p.rsplit("/", 1)[-1] for p in written} == {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    again = registry.tokenizer(str(tmp_path / "saved"))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    options = {"padding": True, "return_offsets_mapping": True}
    expected = ours(corpus["texts"], **options)
    parity.assert_same(again(corpus["texts"], **options), expected)
    parity.assert_same(reference(corpus["texts"], **options), expected)
    assert again.padding_side == reference.padding_side == "left"
    assert again.special_tokens_map == ours.special_tokens_map


def test_saved_prefix_space_survives_a_reload(bloom_dir, tmp_path, corpus, parity):
    byte_level_bpe.load(str(bloom_dir), add_prefix_space=True).save_pretrained(tmp_path)
    again = registry.tokenizer(str(tmp_path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))  # reads the flag from tokenizer.json
    assert again.add_prefix_space is True
    parity.assert_same(again(corpus["texts"], padding=True), reference(corpus["texts"], padding=True))


def test_padding_needs_a_pad_token(bloom_dir):
    ours = byte_level_bpe.load(str(bloom_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(bloom_dir))
    ours.pad_token = None
    reference.pad_token = None
    with pytest.raises(ValueError):
        reference(["a", "bb"], padding=True)
    with pytest.raises(registry.errors.TokenizerError, match="pad token"):
        ours(["a", "bb"], padding=True)
    ours.pad_token = ours.eos_token
    assert ours(["a", "a b c"], padding=True)["input_ids"][0][0] == ours.eos_token_id


def test_clean_up_is_never_applied_to_byte_level_text(ours, reference):
    ids = reference.encode("Hello , world !")
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == "Hello , world !"
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == reference.decode(
        ids, clean_up_tokenization_spaces=True
    )
