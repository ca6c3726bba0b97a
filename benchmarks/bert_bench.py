"""BERT-base forward, ours against the reference (transformers), on the same weights, in one run.

    python benchmarks/bert_bench.py                      # print the table
    python benchmarks/bert_bench.py --write docs/benchmarks_bert.md

The shape is bert-base-uncased (12 layers, hidden 768, 12 heads), batch 8 x 128 tokens, in fp32 and
bf16, without padding and with right padding (lengths 32..128). Both models use SDPA attention and
the same thread count; the reference is ``transformers.BertModel`` with the weights it initialised
and saved, ours is ``registry.from_pretrained`` of that folder. Calls alternate between the two
models (ours first in even rounds, the reference first in odd ones) so that a slow moment of the
machine hits both; the table reports the median time per forward and its spread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import registry

BATCH, TOKENS = 8, 128

NOTES = """## Where the difference comes from

Both sides run the same attention kernel (SDPA's CPU flash kernel), LayerNorm and embeddings; the
difference is in the linear layers, which BERT's blocks run through `registry.fused.linear`
(CPU inference only: autograd off, CPU tensors; training and GPUs take the plain `F.linear` path):

- query, key and value are one GEMM over the concatenated weights (one pass over the activations);
- the weights are packed once for the kernel (oneDNN for bfloat16, MKL for float32) instead of on
  every call; packed copies are cached per layer and rebuilt when a parameter changes, at the cost of
  holding a second copy of the linear weights while the model is used for inference on the CPU;
- bfloat16: bias, GELU, tanh (pooler) and the residual add run in the GEMM's epilogue, so the
  activations are not read and written again; float32: MKL's GEMM (bit-identical to `addmm`, hence the
  0 difference above), with GELU and the residual add applied in place on its output;
- oneDNN's bfloat16 GEMM is up to 2x slower for some shapes than for row blocks of the same shape
  (here 1024 x 768 x 3072 with 2 threads); the first call of each shape times one GEMM against blocks of
  256 rows and keeps the faster.

`with registry.fused.disabled():` runs the plain path, for A/B comparisons. The machine is shared and a
KVM guest: timings vary by about 10% between runs; both models are timed in alternation so that a slow
moment hits both.
"""


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except Exception:
        model = platform.processor() or "unknown CPU"
    return (
        f"{model}, {torch.get_num_threads()} threads (ATen {torch.backends.cpu.get_cpu_capability()}), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def inputs(padded: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (BATCH, TOKENS), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        lengths = torch.linspace(32, TOKENS, BATCH).long()
        for row, length in enumerate(lengths.tolist()):
            ids[row, length:] = 0
            mask[row, length:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def timed(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**batch)
    return time.perf_counter() - start


def compare(folder: Path, dtype: str, padded: bool, rounds: int) -> dict[str, float]:
    import transformers

    ours = registry.from_pretrained(folder, attention="sdpa", dtype=dtype)
    ref = transformers.BertModel.from_pretrained(folder, attn_implementation="sdpa", dtype=getattr(torch, dtype)).eval()
    batch = inputs(padded)
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    with torch.inference_mode():
        real = batch["attention_mask"].bool()
        got, expected = ours(**batch).last_hidden_state[real].float(), ref(**batch).last_hidden_state[real].float()
        exact = transformers.BertModel.from_pretrained(folder, attn_implementation="eager").eval()
        truth = exact(**batch).last_hidden_state[real]  # fp32 eager: the yardstick for both
        del exact
        errors = (
            (got - expected).abs().max().item(),
            (got - truth).abs().max().item(),
            (expected - truth).abs().max().item(),
        )
        for _ in range(2):  # warm-up: allocator, oneDNN primitives
            timed(ours, batch), timed(ref, batch)
        for i in range(rounds):
            order = [("ours", ours), ("reference", ref)]
            for name, model in order if i % 2 == 0 else order[::-1]:
                times[name].append(timed(model, batch))
    ours_s, ref_s = statistics.median(times["ours"]), statistics.median(times["reference"])
    return {
        "ours": ours_s,
        "reference": ref_s,
        "ours_spread": statistics.pstdev(times["ours"]),
        "reference_spread": statistics.pstdev(times["reference"]),
        "speedup": ref_s / ours_s,
        "ours_vs_reference": errors[0],
        "ours_vs_fp32": errors[1],
        "reference_vs_fp32": errors[2],
    }


def table(results: list[tuple[str, bool, dict[str, float]]]) -> str:
    lines = [
        "| dtype | padding | ours (ms) | reference (ms) | speedup "
        "| ours vs reference | ours vs fp32 | reference vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, padded, r in results:
        lines.append(
            f"| {dtype} | {'right, 32..128' if padded else 'none'} "
            f"| {r['ours'] * 1e3:.1f} ± {r['ours_spread'] * 1e3:.1f} "
            f"| {r['reference'] * 1e3:.1f} ± {r['reference_spread'] * 1e3:.1f} "
            f"| {r['speedup']:.2f}x | {r['ours_vs_reference']:.1e} | {r['ours_vs_fp32']:.1e} "
            f"| {r['reference_vs_fp32']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10, help="timed forwards per model and case")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--write", type=Path, default=None, help="write the results as markdown to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bert-base-uncased-random"
        transformers.BertModel(transformers.BertConfig()).save_pretrained(folder)  # bert-base-uncased's shape
        results = []
        for dtype in args.dtypes.split(","):
            for padded in (False, True):
                results.append((dtype, padded, compare(folder, dtype, padded, args.rounds)))
                print(table(results[-1:]).splitlines()[-1], flush=True)
    command = "python " + " ".join(["benchmarks/bert_bench.py", *sys.argv[1:]])
    report = "\n".join(
        [
            "# BERT benchmark: ours against the reference",
            "",
            f"BertModel forward, bert-base-uncased shape, batch {BATCH} x {TOKENS} tokens, SDPA attention on both "
            f"sides, same weights, same threads, median of {args.rounds} alternating calls (± standard deviation). "
            "The last three columns are max abs differences of last_hidden_state over real tokens; 'fp32' is "
            "the reference in float32 with eager attention.",
            "",
            f"- command: `{command}`",
            f"- machine: {machine()}",
            f"- reference: transformers {transformers.__version__}",
            "",
            table(results),
            "",
            NOTES,
        ]
    )
    print(report)
    if args.write:
        args.write.write_text(report)


if __name__ == "__main__":
    main()
