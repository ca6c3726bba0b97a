"""Make BERT-format tokenizer folders for the tests: vocab.txt, tokenizer.json and the config files.

The layout is bert-base-uncased's (or -cased's): BERT normaliser, BERT pre-tokenizer, WordPiece with
``##`` continuations, the ``[CLS] A [SEP] B [SEP]`` template, ``[PAD] [UNK] [CLS] [SEP] [MASK]`` as
ids 0..4 and a few ``[unusedN]`` entries; the vocabulary is trained with the ``tokenizers`` library on
tests/tokenizers/training_corpus.txt.

    python -m tests.tokenizers.make_wordpiece_tokenizer --out /tmp/bert-tokenizer [--cased]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
TRAINING_CORPUS = HERE / "training_corpus.txt"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
RESERVED_TOKENS = ("[unused0]", "[unused1]", "FooBar")  # in the vocabulary, never learned: for never_split
MODEL_MAX_LENGTH = 128


def train_vocab(lines: Sequence[str], *, lowercase: bool, vocab_size: int = 1500) -> list[str]:
    """WordPiece vocabulary (tokens in id order) learned from ``lines`` with BERT's normaliser."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *RESERVED_TOKENS],
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return sorted(vocab, key=vocab.__getitem__)


def bert_tokenizer(tokens: Sequence[str], *, lowercase: bool) -> Tokenizer:
    """A BERT tokenizer.json pipeline around ``tokens`` (only the five named special tokens are added tokens)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def make_wordpiece_tokenizer(folder: str | Path, *, lowercase: bool = True, vocab_only: bool = False) -> Path:
    """Write vocab.txt and, unless ``vocab_only``, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json (as bert-base-uncased / -cased ship them) to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = TRAINING_CORPUS.read_text(encoding="utf-8").splitlines()
    tokens = train_vocab(lines, lowercase=lowercase)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in tokens), encoding="utf-8")
    if vocab_only:
        return folder
    bert_tokenizer(tokens, lowercase=lowercase).save(str(folder / "tokenizer.json"), pretty=True)
    specials = dict(
        zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), SPECIAL_TOKENS, strict=True)
    )
    config = {
        "do_lower_case": lowercase,
        "do_basic_tokenize": True,
        "never_split": None,
        "strip_accents": None,
        "tokenize_chinese_chars": True,
        "model_max_length": MODEL_MAX_LENGTH,
        "tokenizer_class": "BertTokenizer",
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the tokenizer files to")
    parser.add_argument("--cased", action="store_true", help="keep case (bert-base-cased style)")
    parser.add_argument("--vocab-only", action="store_true", help="write vocab.txt alone")
    args = parser.parse_args()
    folder = make_wordpiece_tokenizer(args.out, lowercase=not args.cased, vocab_only=args.vocab_only)
    print(f"wrote a BERT-format tokenizer to {folder}")


if __name__ == "__main__":
    main()
