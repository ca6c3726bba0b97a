"""Where a bfloat16 decode step's time goes between the weight streams (ours only; issue 5's analysis).

    python benchmarks/decode_anatomy.py            # bloom-560m shape, random weights, batch 1 and 8
    python benchmarks/decode_anatomy.py --layers 2 --new-tokens 4   # a quick check of the script

Two measurements, reported in docs/benchmarks.md:

1. The first small operation after a weight stream: a 1 x 1024 bfloat16 add timed alone, right after
   a 64 MB read (our AMX GEMV, ``F.linear``, ``t.sum()``), and once more after that. The second add
   shows whether the cost is a one-off refill (caches) or lasting (the core's state).
2. One ``generate`` call (16-token prompt, 64 new tokens) with every AMX kernel call timed: the time in
   each call, named by its steps (a single projection, or a chain: "attention out + mlp + next qkv" is
   one call from a block's attention output to the next block's query-key-value projection; "decode
   step" is every block of a step in one call, attention 'fused-decode'), and the
   time from the end of each call to the start of the next (what runs between: the cache writes and
   the attention after a qkv projection, the next step's set-up after the lm_head). Totals are per
   decode step, the prompt's calls excluded.

Needs the AMX kernel (``registry.amx.status()``); timings print, nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

import registry
from registry import amx, chains

PRESET = "bloom-560m"


def median_us(fn: Callable[[], Any], before: Callable[[], Any], repeats: int = 200) -> tuple[float, float]:
    """Median microseconds of ``fn`` right after ``before``, and of a second ``fn`` after that."""
    first, second = [], []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        middle = time.perf_counter()
        fn()
        first.append(middle - start)
        second.append(time.perf_counter() - middle)
    return statistics.median(first) * 1e6, statistics.median(second) * 1e6


def first_operation_after_a_stream() -> str:
    weight = torch.randn(8192, 4096).bfloat16()  # 64 MB
    x = torch.randn(1, 4096).bfloat16()
    out = torch.empty(1, 8192, dtype=torch.bfloat16)
    flat = weight.view(-1)
    a, b = torch.randn(1, 1024).bfloat16(), torch.randn(1, 1024).bfloat16()
    streams: dict[str, Callable[[], Any]] = {
        "nothing before": lambda: None,
        "our AMX GEMV, 64 MB": lambda: amx.run(x, weight, None, None, out, 0),
        "F.linear GEMV, 64 MB": lambda: torch.nn.functional.linear(x, weight),
        "t.sum(), 64 MB": flat.sum,
    }
    lines = ["| before the add | add (µs) | a second add (µs) |", "|---|---:|---:|"]
    for label, stream in streams.items():
        first, second = median_us(lambda: a + b, stream)
        lines.append(f"| {label} | {first:.1f} | {second:.1f} |")
    return "\n".join(lines)


def projection_of(weight: torch.Tensor, hidden: int) -> str:
    rows, columns = weight.shape
    if columns == 4 * hidden:
        return "mlp down (fc2)"
    if rows == 4 * hidden:
        return "mlp up (fc1)"
    if rows == 3 * hidden:
        return "qkv"
    if rows == hidden:
        return "attention out"
    return "lm_head"


def chain_name(project: Any, norm: Any, first: Any, second: Any, then: Any, hidden: int) -> str:
    """A chain call named by its steps (registry.chains.run_chain's arguments)."""
    steps = [projection_of(layer[0], hidden) for layer in (project, first, second) if layer is not None]
    name = " + ".join(steps).replace("mlp up (fc1) + mlp down (fc2)", "mlp")
    if norm is not None and project is None:
        name = "LayerNorm + " + name
    return name + (" + next qkv" if then is not None else "")


def step_anatomy(model: Any, batch: int, new_tokens: int) -> str:
    hidden = model.config.hidden_size
    ids = torch.randint(10, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
    kernel: dict[str, float] = defaultdict(float)
    after: dict[str, float] = defaultdict(float)  # from a call's end to the next kernel call
    order: list[str] = []
    call, chain, step = amx._call, chains.call, chains.run_decode_step
    decoding = False  # from the end of the prompt's lm_head call on
    last_end, last_name = 0.0, ""

    def timed(name: str, run: Callable[[], None]) -> None:
        nonlocal decoding, last_end, last_name
        start = time.perf_counter()
        if decoding:
            after[last_name] += start - last_end
        run()
        last_end, last_name = time.perf_counter(), name
        if decoding:
            kernel[name] += last_end - start
            if name not in order:
                order.append(name)
        decoding = decoding or name == "lm_head"  # the gap after it is the first step's set-up

    def timed_call(library: Any, x: torch.Tensor, weight: torch.Tensor, *rest: Any) -> None:
        timed(projection_of(weight, hidden), lambda: call(library, x, weight, *rest))

    def timed_chain(*args: Any) -> None:  # (function, kernel, x, project, norm, first, activation, ...)
        _, _, _, project, norm, first, _, second, _, _, then = (*args, None)[:11]
        timed(chain_name(project, norm, first, second, then, hidden), lambda: chain(*args))

    def timed_step(*args: Any, **options: Any) -> torch.Tensor:  # every block of a step in one call
        result: list[torch.Tensor] = []
        timed(f"decode step ({len(args[1])} blocks)", lambda: result.append(step(*args, **options)))
        return result[0]

    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
        amx._call, chains.call, chains.run_decode_step = timed_call, timed_chain, timed_step
        try:
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])
            total = time.perf_counter() - start
        finally:
            amx._call, chains.call, chains.run_decode_step = call, chain, step
    steps = new_tokens - 1  # decode steps: the first new token comes from the prompt's call
    lines = [
        f"batch {batch}: {total / new_tokens * 1e3:.1f} ms per new token (prompt included), "
        f"{sum(kernel.values()) / steps * 1e3:.1f} ms a step in the kernel, "
        f"{sum(after.values()) / steps * 1e3:.1f} ms between its calls",
        "",
        "| kernel call | in the kernel (ms/step) | until the next kernel call (ms/step) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {kernel[name] / steps * 1e3:.2f} | {after[name] / steps * 1e3:.2f} |" for name in order]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="n_layer (default: the preset's 24)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--attention", default="auto", help="the attention plugin (default: the build's choice)")
    args = parser.parse_args()
    if not amx.ready():
        raise SystemExit(f"the AMX kernel is not in use here: {amx.status().reason}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("## The first small operation after a weight stream\n")
    print(first_operation_after_a_stream())
    torch.manual_seed(0)
    overrides = {"n_layer": args.layers} if args.layers else {}
    model = registry.build(PRESET, dtype="bfloat16", device="cpu", attention=args.attention, **overrides).eval()
    print(f"attention: {model.manifest['components']['attention']['chosen']}")
    print(f"\n## A generate call, 16-token prompt + {args.new_tokens} new tokens, every kernel call timed\n")
    for batch in (int(b) for b in args.batches.split(",")):
        print(step_anatomy(model, batch, args.new_tokens), end="\n\n")


if __name__ == "__main__":
    main()
