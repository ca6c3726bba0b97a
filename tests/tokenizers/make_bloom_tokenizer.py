"""Make a BLOOM-format tokenizer folder for the tests (the real one cannot be downloaded here).

The layout is bigscience/bloom's: a tokenizer.json whose BPE model sits behind BLOOM's regex split and a
ByteLevel pre-tokenizer (no regex of its own, no prefix space), a ByteLevel post-processor that keeps
offsets untrimmed, a ByteLevel decoder, and the special tokens ``<unk> <s> </s> <pad>`` as ids 0..3;
tokenizer_config.json and special_tokens_map.json as the hub ships them (left padding). Only the
vocabulary differs: it is trained with the ``tokenizers`` library on tests/tokenizers/training_corpus.txt.

    python -m tests.tokenizers.make_bloom_tokenizer --out /tmp/bloom-tokenizer
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

HERE = Path(__file__).resolve().parent
TRAINING_CORPUS = HERE / "training_corpus.txt"

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3, as in BLOOM's vocabulary
BLOOM_SPLIT = " ?[^(\\s|[.,!?…。，、।۔،])]+"  # BLOOM's pre-tokenizer regex, as it stands in its tokenizer.json

# bigscience/bloom's tokenizer_config.json and special_tokens_map.json
TOKENIZER_CONFIG = {
    "unk_token": "<unk>",
    "eos_token": "</s>",
    "bos_token": "<s>",
    "pad_token": "<pad>",
    "name_or_path": "bigscience/tokenizer",
    "special_tokens_map_file": None,
    "tokenizer_class": "BloomTokenizerFast",
    "padding_side": "left",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


def train_bloom_tokenizer(lines: list[str], vocab_size: int = 1200) -> Tokenizer:
    """A byte-level BPE with BLOOM's pipeline, trained on ``lines``."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(BLOOM_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(lines, trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != index:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, BLOOM has it at {index}")
    return tokenizer


def make_bloom_tokenizer(folder: str | Path, *, vocab_size: int = 1200) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = TRAINING_CORPUS.read_text(encoding="utf-8").splitlines()
    train_bloom_tokenizer(lines, vocab_size).save(str(folder / "tokenizer.json"), pretty=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n", encoding="utf-8")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write the tokenizer files to")
    parser.add_argument("--vocab-size", type=int, default=1200)
    args = parser.parse_args()
    folder = make_bloom_tokenizer(args.out, vocab_size=args.vocab_size)
    print(f"wrote a BLOOM-format tokenizer to {folder}")


if __name__ == "__main__":
    main()
