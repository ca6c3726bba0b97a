"""Finding, choosing and refusing tokenizer files; typed errors; the call conventions around the outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import tokenizers
import torch

import registry
from plugins.tokenizers.byte_level_bpe import byte_level_bpe
from plugins.tokenizers.wordpiece import wordpiece
from registry.discovery import default_catalog
from registry.errors import NoCandidateError, RegistryError, TokenizerError
from registry.interfaces import TokenizerLike, TokenizerPlugin

transformers = pytest.importorskip("transformers")


def test_plugins_are_registered_with_their_names():
    assert default_catalog().get("tokenizer", "byte-level-bpe") is byte_level_bpe
    assert default_catalog().get("tokenizer", "wordpiece") is wordpiece
    assert isinstance(byte_level_bpe, TokenizerPlugin) and isinstance(wordpiece, TokenizerPlugin)
    names = {entry["name"] for entry in registry.catalog()["tokenizer"]}
    assert {"byte-level-bpe", "wordpiece"} <= names
    assert (byte_level_bpe.name, wordpiece.name) == ("byte-level-bpe", "wordpiece")
    assert byte_level_bpe.capabilities.model_types == frozenset({"BPE"})
    assert wordpiece.capabilities.model_types == frozenset({"WordPiece"})


def test_each_plugin_refuses_the_other_algorithm(bloom_dir, bert_dir):
    assert any("WordPiece" in reason for reason in byte_level_bpe.can_load(str(bert_dir)))
    assert any("WordPiece" in reason for reason in byte_level_bpe.can_load(str(bert_dir / "tokenizer.json")))
    assert any("vocabulary" in reason for reason in byte_level_bpe.can_load(str(bert_dir / "vocab.txt")))
    assert any("BPE" in reason for reason in wordpiece.can_load(str(bloom_dir)))
    assert wordpiece.can_load(str(bert_dir / "vocab.txt")) == []
    with pytest.raises(TokenizerError, match="BPE"):
        wordpiece.load(str(bloom_dir))
    with pytest.raises(TokenizerError, match="WordPiece"):
        byte_level_bpe.load(str(bert_dir / "tokenizer.json"))


def test_a_bpe_that_is_not_byte_level_is_refused(tmp_path):
    sentencepiece_style = tokenizers.Tokenizer(tokenizers.models.BPE({"▁a": 0, "b": 1, "▁ab": 2}, [("▁a", "b")]))
    sentencepiece_style.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    sentencepiece_style.save(str(tmp_path / "tokenizer.json"))
    assert any("not a byte-level BPE" in reason for reason in byte_level_bpe.can_load(str(tmp_path)))
    with pytest.raises(TokenizerError, match="no ByteLevel pre-tokenizer"):
        byte_level_bpe.load(str(tmp_path))
    with pytest.raises(NoCandidateError, match="not a byte-level BPE"):
        registry.tokenizer(str(tmp_path))


def test_wordpiece_with_another_normalizer_keeps_it(bert_dir, tmp_path):
    backend = tokenizers.Tokenizer.from_file(str(bert_dir / "tokenizer.json"))
    backend.normalizer = tokenizers.normalizers.Sequence(
        [tokenizers.normalizers.NFD(), tokenizers.normalizers.Lowercase()]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    shutil.copy(bert_dir / "tokenizer_config.json", tmp_path)  # do_lower_case: true, for a BertNormalizer
    tok = registry.tokenizer(str(tmp_path))
    assert type(tok.backend_tokenizer.normalizer).__name__ == "Sequence"
    assert tok.encode("HELLO World") == backend.encode("HELLO World").ids
    with pytest.raises(TokenizerError, match="not BertNormalizer"):
        wordpiece.load(str(tmp_path), do_lower_case=False)


@pytest.mark.parametrize("kind", ["folder", "tokenizer.json", "vocab.txt"])
def test_registry_tokenizer_picks_the_plugin_for_the_path(bloom_dir, bert_dir, kind):
    bert_path = bert_dir if kind == "folder" else bert_dir / kind
    assert type(registry.tokenizer(str(bert_path)).backend_tokenizer.model).__name__ == "WordPiece"
    if kind != "vocab.txt":
        bloom_path = bloom_dir if kind == "folder" else bloom_dir / kind
        assert type(registry.tokenizer(str(bloom_path)).backend_tokenizer.model).__name__ == "BPE"


def test_explicit_plugin_that_cannot_read_the_path_says_why(bloom_dir):
    with pytest.raises(NoCandidateError, match="not WordPiece") as caught:
        registry.tokenizer(str(bloom_dir), name="wordpiece")
    assert str(bloom_dir) in str(caught.value)


def test_missing_path_is_a_typed_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(NoCandidateError, match="nowhere"):
        registry.tokenizer(str(missing))
    for plugin in (byte_level_bpe, wordpiece):
        with pytest.raises(TokenizerError, match="does not exist") as caught:
            plugin.load(str(missing))
        assert str(missing) in str(caught.value)
        assert isinstance(caught.value, RegistryError) and isinstance(caught.value, ValueError)


def test_folder_without_tokenizer_files(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer.json or vocab.txt"):
        wordpiece.load(str(tmp_path))
    with pytest.raises(NoCandidateError, match="has no tokenizer.json"):
        registry.tokenizer(str(tmp_path))


@pytest.mark.parametrize(
    "content",
    [
        "{ this is not json",
        "",
        "[1, 2, 3]",
        '{"version": "1.0"}',
        '{"model": {"type": "BPE", "vocab": "not a dict"}}',
        '{"model": {"type": "WordPiece"}, "added_tokens": 7}',
    ],
    ids=["broken-json", "empty", "json-list", "no-model", "bad-bpe", "bad-wordpiece"],
)
def test_malformed_tokenizer_json_is_a_typed_error_naming_the_file(tmp_path, content):
    file = tmp_path / "tokenizer.json"
    file.write_text(content)
    for plugin in (byte_level_bpe, wordpiece):
        with pytest.raises(TokenizerError) as caught:
            plugin.load(str(file))
        assert str(file) in str(caught.value)
    with pytest.raises(RegistryError) as caught:  # NoCandidateError, or TokenizerError from the plugin that tried
        registry.tokenizer(str(tmp_path))
    assert str(file) in str(caught.value)


def test_truncated_real_tokenizer_json_is_a_typed_error(bloom_dir, tmp_path):
    text = (bloom_dir / "tokenizer.json").read_text(encoding="utf-8")
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot read tokenizer file") as caught:
        registry.tokenizer(str(tmp_path))
    assert str(tmp_path / "tokenizer.json") in str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "is empty"), (b"\xff\xfe\x00\x81binary", "not UTF-8"), (b"hello\nworld\n", "no unknown token")],
    ids=["empty", "binary", "no-unk"],
)
def test_bad_vocab_txt_is_a_typed_error_naming_the_file(tmp_path, content, message):
    file = tmp_path / "vocab.txt"
    file.write_bytes(content)
    with pytest.raises(TokenizerError, match=message) as caught:
        registry.tokenizer(str(file))
    assert str(file) in str(caught.value)


def test_malformed_config_is_a_typed_error_naming_it(bloom_dir, tmp_path):
    shutil.copy(bloom_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{ nope")
    with pytest.raises(TokenizerError) as caught:
        registry.tokenizer(str(tmp_path))
    assert "tokenizer_config.json" in str(caught.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": 3}))
    with pytest.raises(TokenizerError, match="pad_token"):
        registry.tokenizer(str(tmp_path))


def test_added_token_dicts_in_the_config_are_read(bloom_dir, tmp_path):
    shutil.copy(bloom_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = {"pad_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False}, "padding_side": "right"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = registry.tokenizer(str(tmp_path))
    assert (tok.pad_token, tok.pad_token_id, tok.padding_side, tok.bos_token) == ("</s>", 2, "right", None)


def test_a_loaded_tokenizer_is_tokenizer_like(bloom_dir, bert_dir):
    for path in (bloom_dir, bert_dir):
        assert isinstance(registry.tokenizer(str(path)), TokenizerLike)


def test_bad_call_arguments_are_value_errors_like_the_reference(bert_dir):
    ours = registry.tokenizer(str(bert_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    for call in (
        lambda tok: tok(123),
        lambda tok: tok(["a", 3]),
        lambda tok: tok(["a", "b"], ["c"]),
        lambda tok: tok("a", padding="sideways"),
        lambda tok: tok("a", truncation="middle"),
        lambda tok: tok(["a", "bb"], return_tensors="pt"),  # rows of different lengths
    ):
        with pytest.raises((ValueError, TypeError)):
            call(reference)
        with pytest.raises(TokenizerError):
            call(ours)
    with pytest.raises(TokenizerError, match="padding_side"):
        ours("a", padding=True, padding_side="top")


def test_outputs_read_as_attributes_and_move_to_a_device(bert_dir):
    ours = registry.tokenizer(str(bert_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    mine = ours(["hello world", "hi"], padding=True, return_tensors="pt").to("cpu")
    theirs = reference(["hello world", "hi"], padding=True, return_tensors="pt")
    assert torch.equal(mine.input_ids, theirs.input_ids) and mine.input_ids.dtype == torch.long
    assert torch.equal(mine.attention_mask, theirs.attention_mask)
    assert mine.tokens(0) == theirs.tokens(0) and mine.word_ids(1) == theirs.word_ids(1)
    assert ours("hello", return_tensors="pt")["input_ids"].shape == theirs.input_ids[:1, :3].shape
    as_numpy = ours(["a b", "c d"], return_tensors="np")
    assert as_numpy["input_ids"].tolist() == reference(["a b", "c d"], return_tensors="np")["input_ids"].tolist()
    with pytest.raises(AttributeError):
        _ = mine.not_a_field


def test_decode_accepts_tensors_ints_and_batches(bert_dir):
    ours = registry.tokenizer(str(bert_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    batch = ours(["hello world", "hi there, you"], padding=True, return_tensors="pt")["input_ids"]
    assert ours.decode(batch[0]) == reference.decode(batch[0])
    assert ours.decode(int(batch[0, 1])) == reference.decode(int(batch[0, 1]))
    assert ours.batch_decode(batch, skip_special_tokens=True) == reference.batch_decode(batch, skip_special_tokens=True)
    assert ours.batch_decode(batch[0].tolist()) == reference.batch_decode(batch[0].tolist())


def test_special_tokens_can_be_set_and_added(bert_dir):
    ours = registry.tokenizer(str(bert_dir))
    reference = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
    added = ours.add_special_tokens({"bos_token": "[BOS]", "additional_special_tokens": ["<ent>"]})
    assert added == reference.add_special_tokens({"bos_token": "[BOS]", "additional_special_tokens": ["<ent>"]}) == 2
    assert (ours.bos_token_id, len(ours)) == (reference.bos_token_id, len(reference))
    text = "a <ent> b [BOS]"
    assert ours.encode(text) == reference.encode(text)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == reference.decode(
        reference.encode(text), skip_special_tokens=True
    )
    ours.pad_token_id = ours.sep_token_id
    assert ours.pad_token == ours.sep_token


def test_save_to_a_file_path_is_refused(bert_dir, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(TokenizerError, match="is a file"):
        registry.tokenizer(str(bert_dir)).save_pretrained(target)
