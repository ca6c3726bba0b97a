"""WordPiece tokenizers (BERT), read with ``tokenizers`` from a tokenizer.json or from a vocab.txt alone.

A vocab.txt (one token per line, line number = id) gets BERT's pipeline: the BERT normaliser (clean
control characters, space out CJK ideographs, lowercase and strip accents when asked), the BERT
pre-tokenizer (split on whitespace and punctuation), WordPiece with ``##`` continuations and at most
100 characters a word, and the ``[CLS] A [SEP] B [SEP]`` template with token types 0 for A and 1 for B.

Options come from ``load``'s arguments, else tokenizer_config.json (``do_lower_case``,
``strip_accents``, ``tokenize_chinese_chars``, ``never_split``, the special tokens), else the
tokenizer.json itself, else BERT's defaults (lowercase, accents stripped when lowercasing, CJK spaced).

``never_split`` tokens are kept whole and are not lowercased, as in the reference's Python
BertTokenizer. They must be in the vocabulary (the reference would turn the others into [UNK]). They are
matched where they stand as a word, bounded by characters that are not letters, digits or ``_``; the
reference's Python tokenizer asks for whitespace on both sides, so ``"[X],"`` keeps ``[X]`` whole here
but not there.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from plugins.tokenizers import common
from registry.errors import TokenizerError
from registry.interfaces import TokenizerCapabilities, TokenizerPlugin

BERT_SPECIAL_TOKENS = {
    "unk_token": "[UNK]",
    "sep_token": "[SEP]",
    "pad_token": "[PAD]",
    "cls_token": "[CLS]",
    "mask_token": "[MASK]",
}
MAX_INPUT_CHARS_PER_WORD = 100
"""Longer words become the unknown token (BERT's limit)."""


class WordPiecePlugin(TokenizerPlugin):
    name = "wordpiece"
    capabilities = TokenizerCapabilities(
        files=(common.TOKENIZER_FILE, common.VOCAB_FILE), model_types=frozenset({"WordPiece"}), priority=10
    )

    def can_load(self, path: str) -> list[str]:
        try:
            source = common.locate(path, vocab_files=True)
        except TokenizerError as error:
            return [str(error)]
        if source.kind == "vocab.txt":
            return []  # read and checked by load
        return common.refuse_model_type(source, "WordPiece")

    def load(
        self,
        path: str,
        *,
        do_lower_case: bool | None = None,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool | None = None,
        never_split: Sequence[str] | None = None,
        padding_side: str | None = None,
        model_max_length: int | None = None,
    ) -> common.Tokenizer:
        """Load a WordPiece tokenizer from a folder, a tokenizer.json or a vocab.txt.

        Args:
            path: a checkpoint folder (its tokenizer.json, else its vocab.txt), or either file;
                tokenizer_config.json and special_tokens_map.json are read from the same folder.
            do_lower_case: lowercase the text (BERT "uncased").
            strip_accents: remove accents; unset, it follows ``do_lower_case``.
            tokenize_chinese_chars: put spaces around CJK ideographs, so each is a word.
            never_split: tokens to keep whole (and not lowercase); each must be in the vocabulary.
            padding_side: "left" or "right" (default: the config's, else "right").
            model_max_length: the longest input of the model (default: the config's, else no limit).

        Raises:
            TokenizerError: no tokenizer file there, an unreadable or malformed file, a tokenizer.json
                of another model type, or options the files cannot take.

        Example:
            >>> tok = wordpiece.load("bert-base-uncased/vocab.txt")
            >>> tok("Hello", "world")["token_type_ids"]
            [0, 0, 0, 1, 1]
        """
        source = common.locate(path, vocab_files=True)
        config = common.read_config(source.folder)
        named, extra = common.special_tokens(config, folder=source.folder, defaults=BERT_SPECIAL_TOKENS)
        explicit = {
            "lowercase": do_lower_case,
            "strip_accents": strip_accents,
            "handle_chinese_chars": tokenize_chinese_chars,
        }
        from_config = {
            field: config[key]
            for field, key in (
                ("lowercase", "do_lower_case"),
                ("strip_accents", "strip_accents"),
                ("handle_chinese_chars", "tokenize_chinese_chars"),
            )
            if key in config
        }
        if source.kind == "vocab.txt":
            backend = _from_vocab(source.file, named)
            normalizer: dict[str, Any] = {
                "clean_text": True,
                "handle_chinese_chars": True,
                "strip_accents": None,
                "lowercase": True,
            }
        else:
            backend = common.read_backend(source.file, "WordPiece")
            normalizer = _bert_normalizer(backend, source.file, explicit)
        in_effect: dict[str, Any] = {}
        if normalizer:  # a BertNormalizer: the config's options, then load's, over the file's
            in_effect = {**normalizer, **from_config, **{k: v for k, v in explicit.items() if v is not None}}
            if in_effect != normalizer:
                backend.normalizer = normalizers.BertNormalizer(**in_effect)

        split = list(never_split if never_split is not None else config.get("never_split") or [])
        _keep_whole(backend, split, source.file)
        sides = common.sides_and_limits(
            config, backend, padding_side=padding_side, default_padding_side="right", model_max_length=model_max_length
        )
        settings = common.Settings(
            name_or_path=str(path),
            special_tokens=named,
            extra_special_tokens=extra,
            model_input_names=tuple(
                config.get("model_input_names") or ("input_ids", "token_type_ids", "attention_mask")
            ),
            clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
            clean_up_applies=True,
            config={"tokenizer_class": "BertTokenizer", **config},
            options={
                # in effect; for another normaliser, the config's values (kept for saving)
                "do_lower_case": in_effect.get("lowercase", config.get("do_lower_case")),
                "strip_accents": in_effect.get("strip_accents", config.get("strip_accents")),
                "tokenize_chinese_chars": in_effect.get("handle_chinese_chars", config.get("tokenize_chinese_chars")),
                "never_split": split or None,
            },
            file_truncation=backend.truncation,
            file_padding=backend.padding,
            **sides,
        )
        tokenizer = common.Tokenizer(backend, settings)
        if source.kind == "vocab.txt":
            _add_template(tokenizer)
        return tokenizer


def read_vocab(file: Path) -> dict[str, int]:
    """vocab.txt -> token -> id (the line number; a repeated token keeps its last line, as the reference).

    Raises:
        TokenizerError: unreadable, not UTF-8, or empty.
    """
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise TokenizerError(f"cannot read vocabulary file '{file}': {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise TokenizerError(f"vocabulary file '{file}' is not UTF-8 text: {error}") from error
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last token
    if not lines:
        raise TokenizerError(f"vocabulary file '{file}' is empty")
    return {token: index for index, token in enumerate(lines)}


def _from_vocab(file: Path, named: dict[str, str | None]) -> tokenizers.Tokenizer:
    """BERT's pipeline around the WordPiece vocabulary of a vocab.txt."""
    vocab = read_vocab(file)
    unk = named["unk_token"]
    if unk is None or unk not in vocab:
        raise TokenizerError(f"vocabulary file '{file}' has no unknown token {unk!r}; WordPiece needs one")
    backend = tokenizers.Tokenizer(
        models.WordPiece(vocab, unk_token=unk, max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _add_template(tokenizer: common.Tokenizer) -> None:
    """``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with token types 0 for A, 1 for B."""
    cls, sep = tokenizer.cls_token, tokenizer.sep_token
    if cls is None or sep is None:
        raise TokenizerError(f"'{tokenizer.name_or_path}' sets no cls_token or sep_token; BERT's template needs both")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, tokenizer.cls_token_id), (sep, tokenizer.sep_token_id)],
    )


def _bert_normalizer(backend: tokenizers.Tokenizer, file: Path, explicit: dict[str, Any]) -> dict[str, Any]:
    """The fields of the file's BertNormalizer (empty when it has another normaliser, which options
    from the config leave alone and explicit options cannot change)."""
    normalizer = backend.normalizer
    if isinstance(normalizer, normalizers.BertNormalizer):
        state = json.loads(normalizer.__getstate__())
        return {key: state[key] for key in ("clean_text", "handle_chinese_chars", "strip_accents", "lowercase")}
    asked = [key for key, value in explicit.items() if value is not None]
    if asked:
        raise TokenizerError(
            f"'{file}' normalises with {type(normalizer).__name__}, not BertNormalizer: cannot apply {', '.join(asked)}"
        )
    return {}


def _keep_whole(backend: tokenizers.Tokenizer, never_split: list[str], file: Path) -> None:
    """Make ``never_split`` tokens added tokens matched on the raw text, as whole words."""
    missing = [token for token in never_split if backend.token_to_id(token) is None]
    if missing:
        raise TokenizerError(
            f"never_split tokens {missing} are not in the vocabulary of '{file}' (they would encode as unknown)"
        )
    known = common.added_tokens(backend)
    new = [AddedToken(t, single_word=True, normalized=False) for t in dict.fromkeys(never_split) if t not in known]
    if new:
        backend.add_tokens(new)


wordpiece = WordPiecePlugin()

__all__ = ["BERT_SPECIAL_TOKENS", "WordPiecePlugin", "read_vocab", "wordpiece"]
