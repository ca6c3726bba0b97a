"""BLOOM prefill and greedy generation, ours against the reference (transformers), with rooflines.

    # the full run (about 15 minutes on a quiet machine; check `uptime` first)
    python benchmarks/generation_bench.py --profile --write docs/benchmarks_generation.md \\
        --plot docs/img/generation.png --json /tmp/generation.json
    # a quick check of the script (seconds of compute, numbers meaningless)
    python benchmarks/generation_bench.py --layers 2 --new-tokens 4 --rounds 2 --prefill-rounds 2 --no-memory
    # only where a decode step goes (batch 1, both dtypes, ours and the reference)
    python benchmarks/generation_bench.py --cases none --profile

The shape is bloom-560m (24 layers, hidden 1024, 16 heads, vocabulary 250880) with random weights:
``registry.build("bloom-560m", dtype=...)`` seeded, saved with ``save_pretrained``, and the reference
``transformers.BloomForCausalLM`` loaded from that folder in the same dtype, so both run the same weights.
Both run in one process with the same torch thread count, under ``torch.inference_mode``; calls alternate
(ours first in even rounds, the reference first in odd ones), after a warm-up call of each, and the tables
give the median and the standard deviation.

Cases, for float32 and bfloat16:

- prefill 1 x 128: ``model(input_ids=ids, use_cache=True, logits_to_keep=1)`` on both sides; this is what
  the reference's ``generate()`` runs for a prompt (it sets ``logits_to_keep=1`` itself), i.e. the time to
  the first token's logits;
- generation: greedy, a 16-token prompt (no padding, attention mask of ones), 64 new tokens, batch 1 and 8.
  Neither side may stop early: ours gets ``eos_token_id=[]``, the reference ``eos_token_id=None`` and
  ``do_sample=False``; both outputs are checked to hold 64 new tokens.
  tokens/s = batch * 64 / (seconds of one ``generate`` call);
  decode ms/step = (generate seconds - seconds of a prefill of the same prompt, timed separately) / 63.

Roofline (``benchmarks/roofline.py`` measures the machine and holds the cost model): memory bandwidth
(the fastest of a median ``t.sum()`` of 1 GiB float32 and the lm_head GEMVs, ``F.linear`` per dtype and
``registry.amx`` in bfloat16) and matmul rates (best of a 2048^3 GEMM and the prefill's
128 x 1024 x 4096 one, per dtype) are measured at the start and at the end of the run, and the better
figure of the two is used. With h hidden, L layers, V vocabulary, e bytes per element, B batch,
parameters = L (12 h^2 + 13 h) + V h + 4 h (the tied embedding is the lm_head):

- decode step at key length S: bytes = parameters * e + 2 L B S h e (keys and values read);
  FLOPs = 24 B L h^2 + 4 B L S h (QK^T, PV) + 2 B V h (lm_head);
- prefill of T tokens (logits of the last one): bytes = parameters * e + 2 L B T h e (keys and values
  written); FLOPs = 24 B T L h^2 + 2 B L h T (T + 1) (causal QK^T, PV) + 2 B V h;
- a case's lower bound is max(bytes / bandwidth, FLOPs / matmul rate), summed step by step over a
  generation (prefill of P, then decode steps at S = P + 1 .. P + N - 1); "% roofline" = lower bound /
  measured median time. The fp32 decode target uses the memory term alone.

Peak memory (``--no-memory`` skips it): each (implementation, dtype, case) runs once in a fresh process
(``--memory-child``) that loads the saved folder (ours: ``registry.from_pretrained``, the reference:
``from_pretrained``), reads every parameter once and runs the case; it reports its peak RSS (VmHWM, loading
included; not ``ru_maxrss``, which Linux carries over fork and exec from the large parent) and the case's
working memory (peak RSS during the case, after a reset through /proc/self/clear_refs, minus the RSS after
loading).

Also reported: involuntary context switches per timed call (other work taking a core mid-call: the sign
of a busy machine) and, with ``--profile``, torch.profiler's top ops of one batch-1 decode step and one
prefill (the kernels' calls appear as ``registry.amx.linear MxKxN`` and, for a step of all the blocks,
``registry.amx.step BxT tokens L blocks``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from roofline import (
    AMX_GEMV,
    BloomShape,
    Limit,
    Machine,
    decode_steps_limit,
    generation_limit,
    limit,
    measure,
    prefill_cost,
)

import registry

PRESET = "bloom-560m"
SCRIPT = "benchmarks/generation_bench.py"
IMPLEMENTATIONS = ("ours", "reference")
REFERENCE_ATTENTION = "eager"  # BloomForCausalLM raises for "sdpa": eager is its only (and so fastest) path
MIB = 2**20
Samples = dict[str, dict[str, list[float]]]  # case key -> implementation -> seconds per call

# targets of issue 5 (not timed tests): (dtype, row kind, what, threshold)
TARGETS = (
    ("bfloat16", "generate", "tokens/s vs the reference", 2.0),
    ("bfloat16", "prefill", "speed vs the reference", 2.0),
    ("float32", "decode", "fraction of the memory-bandwidth roofline", 0.8),
)


@dataclass(frozen=True)
class Case:
    """``prefill`` (batch x tokens, one call) or ``generate`` (batch, prompt tokens, new tokens)."""

    kind: str
    batch: int
    tokens: int
    new_tokens: int = 0

    @property
    def name(self) -> str:
        return "prefill" if self.kind == "prefill" else f"generate-b{self.batch}"

    @property
    def label(self) -> str:
        if self.kind == "prefill":
            return f"prefill {self.batch}x{self.tokens}"
        return f"generate b{self.batch} ({self.tokens}+{self.new_tokens})"


@dataclass
class Row:
    """One line of the table; times in seconds, ``count`` tokens per call (tokens/s rows)."""

    case: str
    kind: str  # prefill | generate | decode
    dtype: str
    ours: float
    ours_spread: float
    reference: float
    reference_spread: float
    roofline: Limit
    count: int = 0
    memory: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.reference / self.ours

    def fraction(self, implementation: str) -> float:
        return self.roofline.seconds / (self.ours if implementation == "ours" else self.reference)

    def memory_fraction(self, implementation: str) -> float:
        return self.roofline.memory_seconds / (self.ours if implementation == "ours" else self.reference)


# -- models and inputs ----------------------------------------------------------------------------


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_and_save(dtype: str, layers: int | None, folder: Path) -> registry.AssembledModel:
    torch.manual_seed(0)
    overrides: dict[str, Any] = {"n_layer": layers} if layers else {}
    model = registry.build(PRESET, dtype=dtype, device="cpu", **overrides).eval()
    model.save_pretrained(folder)
    return model


def load(implementation: str, folder: Path, dtype: str) -> Any:
    """The model as a user loads it from the saved folder (the memory children, and the reference)."""
    if implementation == "ours":
        return registry.from_pretrained(folder, dtype=dtype).eval()
    import transformers

    quiet_transformers()
    return transformers.BloomForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), attn_implementation=REFERENCE_ATTENTION
    ).eval()


def prompt(batch: int, tokens: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(batch * 1000 + tokens)
    return torch.randint(10, vocab, (batch, tokens), generator=g)


def shape_of(model: registry.AssembledModel) -> BloomShape:
    config = model.config
    shape = BloomShape(layers=config.n_layer, hidden=config.hidden_size, vocab=config.vocab_size)
    if shape.parameters != model.num_parameters():
        raise RuntimeError(f"cost model counts {shape.parameters} parameters, the model has {model.num_parameters()}")
    return shape


# -- the calls that are timed ---------------------------------------------------------------------


def prefill_call(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    """Time to the first token's logits, as both ``generate()`` run a prompt."""
    return lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1)


def prompt_prefill_call(implementation: str, model: Any, ids: torch.Tensor, max_length: int) -> Callable[[], Any]:
    """The prefill inside ``generate()``: with the attention mask; ours into a cache sized as its generate() asks
    for one (``model.new_cache``), the reference into the DynamicCache its forward creates, as its generate()."""
    mask = torch.ones_like(ids)
    if implementation == "reference":
        return lambda: model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    return lambda: model(
        input_ids=ids,
        attention_mask=mask,
        past_key_values=model.new_cache(ids.shape[0], max_length),
        use_cache=True,
        logits_to_keep=1,
    )


def generate_call(
    implementation: str, model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int
) -> Callable[[], torch.Tensor]:
    if implementation == "ours":  # no EOS: every row runs all new_tokens steps
        return lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=[])
    return lambda: model.generate(
        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None
    )


def case_call(implementation: str, model: Any, case: Case, vocab: int) -> Callable[[], Any]:
    ids = prompt(case.batch, case.tokens, vocab)
    if case.kind == "prefill":
        return prefill_call(model, ids)
    return generate_call(implementation, model, ids, torch.ones_like(ids), case.new_tokens)


def timed(fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds of one call, and the involuntary context switches during it (other work took the CPU)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - before


def alternate(
    calls: dict[str, Callable[[], Any]], rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds and context switches per call, ``rounds`` calls of each, the order flipped every round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    switches: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for i in range(rounds):
        for name in names if i % 2 == 0 else names[::-1]:
            seconds, switched = timed(calls[name])
            times[name].append(seconds)
            switches[name].append(switched)
    return times, switches


def summary(samples: list[float]) -> tuple[float, float]:
    return statistics.median(samples), statistics.pstdev(samples)


# -- checks ---------------------------------------------------------------------------------------


def check_prefill(outputs: dict[str, Any], dtype: str) -> str:
    ours, ref = (outputs[name].logits[:, -1].float() for name in IMPLEMENTATIONS)
    diff = (ours - ref).abs().max().item()
    same = bool((ours.argmax(-1) == ref.argmax(-1)).all())
    line = f"{dtype} prefill: last-position logits max |ours - reference| = {diff:.1e}, same argmax: {same}"
    if dtype == "float32" and diff > 1e-3:
        raise RuntimeError(f"ours and the reference disagree: {line}")
    return line


def check_generation(outputs: dict[str, torch.Tensor], case: Case, dtype: str) -> str:
    expected = (case.batch, case.tokens + case.new_tokens)
    for name, tokens in outputs.items():
        if tuple(tokens.shape) != expected:
            raise RuntimeError(f"{name} returned {tuple(tokens.shape)} tokens for {case.label}; expected {expected}")
    ours, ref = (outputs[name][:, case.tokens :] for name in IMPLEMENTATIONS)
    agree = (ours == ref).float().mean().item()
    verdict = "identical" if agree == 1.0 else f"{agree:.1%} of new tokens agree"
    return f"{dtype} {case.label}: both {case.new_tokens} new tokens per row, greedy tokens {verdict}"


# -- one dtype: timing, checks, profile -----------------------------------------------------------


def run_case(models: dict[str, Any], case: Case, vocab: int, rounds: int, dtype: str) -> tuple[Samples, Samples, str]:
    """Warm up (and check) with one call each, then time ``rounds`` alternating calls."""
    calls = {name: case_call(name, models[name], case, vocab) for name in IMPLEMENTATIONS}
    outputs = {name: calls[name]() for name in IMPLEMENTATIONS}
    check = check_prefill(outputs, dtype) if case.kind == "prefill" else check_generation(outputs, case, dtype)
    print(check, flush=True)
    samples: Samples = {}
    switches: Samples = {}
    samples[case.name], switches[case.name] = alternate(calls, rounds)
    if case.kind == "generate":  # the prompt's prefill, to take out of the generate time
        ids = prompt(case.batch, case.tokens, vocab)
        total = case.tokens + case.new_tokens
        prefills = {name: prompt_prefill_call(name, models[name], ids, total) for name in IMPLEMENTATIONS}
        for fn in prefills.values():
            fn()
        key = f"{case.name}-prompt-prefill"
        samples[key], switches[key] = alternate(prefills, max(rounds, 5))
    return samples, switches, check


def per_step(generate: tuple[float, float], prefill: tuple[float, float], steps: int) -> tuple[float, float]:
    """Decode seconds per step: (generate - prompt prefill) / steps; the two spreads combined as independent."""
    return (generate[0] - prefill[0]) / steps, (generate[1] ** 2 + prefill[1] ** 2) ** 0.5 / steps


def rows_for(case: Case, dtype: str, samples: Samples, shape: BloomShape, machine: Machine) -> list[Row]:
    ours, ref = (summary(samples[case.name][name]) for name in IMPLEMENTATIONS)
    if case.kind == "prefill":
        bound = limit(prefill_cost(shape, batch=case.batch, tokens=case.tokens, dtype=dtype), machine, dtype)
        return [Row(case.label, "prefill", dtype, *ours, *ref, bound, case.batch * case.tokens)]
    steps = case.new_tokens - 1
    whole = generation_limit(shape, machine, dtype=dtype, batch=case.batch, prompt=case.tokens, new=case.new_tokens)
    step = decode_steps_limit(shape, machine, dtype=dtype, batch=case.batch, prompt=case.tokens, new=case.new_tokens)
    ours_prefill, ref_prefill = (summary(samples[f"{case.name}-prompt-prefill"][name]) for name in IMPLEMENTATIONS)
    return [
        Row(case.label, "generate", dtype, *ours, *ref, whole, case.batch * case.new_tokens),
        Row(
            f"decode b{case.batch}",
            "decode",
            dtype,
            *per_step(ours, ours_prefill, steps),
            *per_step(ref, ref_prefill, steps),
            step.scaled(1 / steps),
        ),
    ]


def profile_decode(models: dict[str, Any], dtype: str, prompt_len: int, new_tokens: int, vocab: int) -> str:
    """torch.profiler over one decode step at batch 1, ours and the reference: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt(1, prompt_len, vocab)
    mask = torch.ones(1, prompt_len + 1, dtype=torch.long)
    out = []
    for name in IMPLEMENTATIONS:
        model = models[name]
        run_prompt = prompt_prefill_call(name, model, ids, prompt_len + new_tokens)

        def step(cache: Any, token: torch.Tensor, model: Any = model) -> Any:
            return model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)

        for _ in range(2):  # warm-up on fresh caches: a step writes into its cache
            first = run_prompt()
            token = first.logits[:, -1].argmax(-1, keepdim=True)
            step(first.past_key_values, token)
        first = run_prompt()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(first.past_key_values, token)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        out.append(f"### {name}, {dtype}, one decode step, batch 1, {prompt_len} cached tokens\n\n```\n{table}\n```")
    return "\n\n".join(out)


def profile_prefill(models: dict[str, Any], dtype: str, tokens: int, vocab: int) -> str:
    """torch.profiler over one 1 x ``tokens`` prefill, ours and the reference: top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    ids = prompt(1, tokens, vocab)
    out = []
    for name in IMPLEMENTATIONS:
        run = prompt_prefill_call(name, models[name], ids, tokens)
        for _ in range(2):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        out.append(f"### {name}, {dtype}, one prefill of 1 x {tokens} tokens\n\n```\n{table}\n```")
    return "\n\n".join(out)


# -- peak memory in fresh processes ---------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def touch(model: torch.nn.Module) -> None:
    """Read every parameter once, so that weights mapped from the file but not yet read count as loaded."""
    for parameter in model.parameters():
        parameter.detach().sum()


def memory_child(args: argparse.Namespace) -> None:
    """Load one implementation from the folder, run one case once, print its memory figures as JSON.

    Peaks come from VmHWM, not ``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec, so a child
    of a large parent reports the parent's size.
    """
    case = parse_cases(args.case, args)[0]
    model = load(args.impl, args.folder, args.dtype)  # outside inference_mode: parameters as a user has them
    with torch.inference_mode():
        touch(model)
        gc.collect()
        loaded, load_peak = rss_bytes(), vm_hwm_bytes()
        resettable = reset_peak()
        case_call(args.impl, model, case, model.config.vocab_size)()
        case_peak = vm_hwm_bytes()
    figures = {
        "peak_rss": max(load_peak, case_peak),
        "load_peak_rss": load_peak,
        "loaded_rss": loaded,
        "case_peak_rss": case_peak,
        "working": case_peak - loaded,
    }
    print(json.dumps({**figures, "peak_reset": resettable, "transformers_imported": "transformers" in sys.modules}))


def measure_memory(folder: Path, dtype: str, case: Case, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out = {}
    for name in IMPLEMENTATIONS:
        command = [
            sys.executable,
            SCRIPT if Path(SCRIPT).exists() else __file__,
            "--memory-child",
            "--impl",
            name,
            "--dtype",
            dtype,
            "--case",
            case.name,
            "--folder",
            str(folder),
            "--threads",
            str(torch.get_num_threads()),
            "--prompt-len",
            str(args.prompt_len),
            "--new-tokens",
            str(args.new_tokens),
            "--prefill-len",
            str(args.prefill_len),
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"memory child {name} {dtype} {case.name} failed:\n{done.stderr[-3000:]}")
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  memory {name:9s} {dtype} {case.name}: peak {out[name]['peak_rss'] / MIB:.0f} MiB, "
            f"working {out[name]['working'] / MIB:.0f} MiB",
            flush=True,
        )
    return out


# -- one dtype end to end -------------------------------------------------------------------------


@dataclass
class DtypeResult:
    """What one dtype's run collected; rows are computed at the end, on the final machine limits."""

    dtype: str
    shape: BloomShape
    cases: list[Case]
    samples: Samples = field(default_factory=dict)
    switches: Samples = field(default_factory=dict)  # involuntary context switches per timed call
    checks: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    memory: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # case -> implementation -> figures
    components: str = ""  # ours' chosen attention and cache

    def rows(self, machine: Machine) -> list[Row]:
        out = []
        for case in self.cases:
            for row in rows_for(case, self.dtype, self.samples, self.shape, machine):
                row.memory = self.memory.get(case.name, {}) if row.kind != "decode" else {}
                out.append(row)
        return out


@contextlib.contextmanager
def models_for(dtype: str, layers: int | None, folder: Path) -> Iterator[dict[str, Any]]:
    ours = build_and_save(dtype, layers, folder)
    models = {"ours": ours, "reference": load("reference", folder, dtype)}
    try:
        yield models
    finally:
        models.clear()
        del ours
        gc.collect()


def run_dtype(dtype: str, cases: list[Case], machine: Machine, args: argparse.Namespace, tmp: Path) -> DtypeResult:
    """Time every case (printing provisional rows on the start's limits), profile, then measure memory."""
    folder = tmp / f"{PRESET}-{dtype}"
    with models_for(dtype, args.layers, folder) as models, torch.inference_mode():
        result = DtypeResult(dtype, shape_of(models["ours"]), cases)
        chosen = models["ours"].manifest["components"]
        result.components = ", ".join(f"{slot} `{chosen[slot]['chosen']}`" for slot in ("attention", "cache"))
        for case in cases:
            rounds = args.prefill_rounds if case.kind == "prefill" else args.rounds
            case_samples, switches, check = run_case(models, case, result.shape.vocab, rounds, dtype)
            result.samples.update(case_samples)
            result.switches.update(switches)
            result.checks.append(check)
            for row in rows_for(case, dtype, case_samples, result.shape, machine):
                print(table_line(row), flush=True)
        if args.profile:
            result.profiles.append(profile_decode(models, dtype, args.prompt_len, args.new_tokens, result.shape.vocab))
            result.profiles.append(profile_prefill(models, dtype, args.prefill_len, result.shape.vocab))
            print(f"{dtype}: profiled one decode step and one prefill of each (in the report below)", flush=True)
    if not args.no_memory:
        for case in cases:
            result.memory[case.name] = measure_memory(folder, dtype, case, args)
    return result


# -- report ---------------------------------------------------------------------------------------

HEADER = (
    "| case | dtype | ours | reference | speedup | roofline (bound) | ours % roofline | reference % roofline "
    "| peak RSS ours / ref (MiB) | case working memory ours / ref (MiB) |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def figure(row: Row, seconds: float, spread: float) -> str:
    if row.kind == "generate":  # tokens/s; spread through d(n/t) = n dt / t^2
        return f"{row.count / seconds:.1f} ± {row.count * spread / seconds**2:.1f} tok/s"
    unit = "ms" if row.kind == "prefill" else "ms/step"
    return f"{seconds * 1e3:.1f} ± {spread * 1e3:.1f} {unit}"


def roofline_figure(row: Row) -> str:
    if row.kind == "generate":
        return f"{row.count / row.roofline.seconds:.1f} tok/s ({row.roofline.bound})"
    return f"{row.roofline.seconds * 1e3:.1f} {'ms' if row.kind == 'prefill' else 'ms/step'} ({row.roofline.bound})"


def memory_figures(row: Row) -> tuple[str, str]:
    if not row.memory:
        return "—", "—"
    ours, ref = row.memory["ours"], row.memory["reference"]
    # without a reset of the peak, the case's peak is the process's, loading included
    caveat = "" if ours["peak_reset"] and ref["peak_reset"] else " (peak not reset: includes loading)"
    return (
        f"{ours['peak_rss'] / MIB:.0f} / {ref['peak_rss'] / MIB:.0f}",
        f"{ours['working'] / MIB:.0f} / {ref['working'] / MIB:.0f}{caveat}",
    )


def table_line(row: Row) -> str:
    peak, working = memory_figures(row)
    return (
        f"| {row.case} | {row.dtype} | {figure(row, row.ours, row.ours_spread)} "
        f"| {figure(row, row.reference, row.reference_spread)} | {row.speedup:.2f}x | {roofline_figure(row)} "
        f"| {row.fraction('ours'):.0%} | {row.fraction('reference'):.0%} | {peak} | {working} |"
    )


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, *(table_line(row) for row in rows)])


def targets(rows: list[Row]) -> str:
    lines = ["| target | case | measured | met |", "|---|---|---:|---|"]
    for dtype, kind, what, threshold in TARGETS:
        goal = f"{dtype} {kind}: {what} >= " + (f"{threshold:.0%}" if kind == "decode" else f"{threshold:g}x")
        matching = [row for row in rows if row.dtype == dtype and row.kind == kind]
        if not matching:
            lines.append(f"| {goal} | — | not run | — |")
        for row in matching:
            value = row.memory_fraction("ours") if kind == "decode" else row.speedup
            shown = f"{value:.0%}" if kind == "decode" else f"{value:.2f}x"
            lines.append(f"| {goal} | {row.case} | {shown} | {'met' if value >= threshold else 'missed'} |")
    return "\n".join(lines)


def machine_line() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    import transformers

    return (
        f"{cpu}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads (ATen "
        f"{torch.backends.cpu.get_cpu_capability()}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
    )


def limits_table(measurements: list[Machine], used: Machine) -> str:
    """One column per measurement (start, end) and the one the roofline uses (the better of each)."""
    names = ["start", "end"][: len(measurements)]
    columns = [*measurements, used]
    lines = [f"| limit | {' | '.join(names)} | used |", "|---|" + "---:|" * len(columns)]

    def line(label: str, values: list[float], unit: str) -> str:
        shown = " | ".join(f"{v / 1e9:.2f}" if unit == "GB/s" else f"{v / 1e9:.0f}" for v in values)
        return f"| {label} ({unit}) | {shown} |"

    lines.append(line("read bandwidth, median `t.sum()` of 1 GiB fp32", [m.read_bandwidth for m in columns], "GB/s"))
    lines.append(
        line("copy bandwidth, median `dst.copy_(src)`, read + write", [m.copy_bandwidth for m in columns], "GB/s")
    )
    for dtype in used.gemv_bandwidth:
        values = [m.gemv_bandwidth.get(dtype, 0.0) for m in columns]
        how = "`registry.amx`" if dtype == AMX_GEMV else f"{dtype}, `F.linear`"
        lines.append(line(f"lm_head GEMV weight bandwidth, {how} of 1 row", values, "GB/s"))
    lines.append(
        line("**memory bandwidth used** (the fastest of the above)", [m.memory_bandwidth for m in columns], "GB/s")
    )
    for dtype, rates in used.matmul_rates.items():
        for gemm in rates:
            values = [m.matmul_rates[dtype][gemm] for m in columns]
            lines.append(line(f"matmul rate, {dtype}, {gemm}, best of repeats", values, "GFLOP/s"))
    return "\n".join(lines)


def disturbance(results: list[DtypeResult]) -> str:
    """Median involuntary context switches per timed call: how often other work took the CPU mid-call."""
    lines = ["| dtype | timed calls | ours | reference |", "|---|---|---:|---:|"]
    for result in results:
        for key, per_implementation in result.switches.items():
            ours, ref = (statistics.median(per_implementation[name]) for name in IMPLEMENTATIONS)
            lines.append(f"| {result.dtype} | {key} | {ours:.0f} | {ref:.0f} |")
    return "\n".join(lines)


def drift(measurements: list[Machine]) -> float:
    """The largest relative difference between start and end of the read bandwidth and matmul rates."""
    if len(measurements) < 2:
        return 0.0
    first, last = measurements[0], measurements[-1]
    pairs = [(first.read_bandwidth, last.read_bandwidth)]
    pairs += [(first.matmul_rate(d), last.matmul_rate(d)) for d in first.matmul_rates]
    return max(abs(a - b) / max(a, b) for a, b in pairs)


DISTURBANCE = """Involuntary context switches per timed call (median, from `getrusage`): how often other processes
took a core in the middle of a call. With as many torch threads as cores, a preempted thread stalls the
other at every parallel region, and a call can take several times longer; figures far above the rest mark
timings taken while the machine was busy."""

FORMULAS = """## Roofline

Each case's lower bound is max(bytes / memory bandwidth, FLOPs / matmul rate); "% roofline" is that bound over
the measured median time (100% = the machine's limit). The limits are measured in the same run, at its start
and at its end, and the roofline takes the better figure of the two (the best the machine did: a moment
of contention on the shared machine must not lower the bar). The matmul rate is the faster of the two GEMMs.
With h the hidden size, L layers, V the vocabulary, e bytes per element, B the batch:

- parameters read once per forward: L (12 h² + 13 h) + V h + 4 h (the embedding is the tied lm_head);
- decode step at key length S (cached tokens + the new one): bytes = parameters · e + 2 L B S h e (keys and
  values read); FLOPs = 24 B L h² + 4 B L S h (QKᵀ, PV) + 2 B V h (lm_head);
- prefill of T tokens, logits for the last position only: bytes = parameters · e + 2 L B T h e (keys and values
  written); FLOPs = 24 B T L h² + 2 B L h T (T + 1) (QKᵀ, PV over the causal triangle) + 2 B V h;
- generation of N tokens from a P-token prompt: prefill(P) + the decode steps at S = P + 1 … P + N − 1, each
  step bounded on its own; decode rows give the mean bound of those N − 1 steps.

Activations, the logits and the embedding rows gathered are left out (small against the weights).
The fp32 decode target compares against the memory term alone (bytes / bandwidth).
"""

NOTES = """## Comparability

- Attention: ours runs its default (`auto`, which takes `fused-decode` on this machine: prompts and decode
  steps each in one kernel call, attention included; see docs/generation.md); the reference's
  `BloomForCausalLM` has no SDPA path (`attn_implementation="sdpa"` raises), so it runs `"eager"`, its only
  implementation: baddbmm with the ALiBi bias, a float32 softmax and bmm, materialising the attention
  probabilities.
- Prefill: both sides are called as `model(input_ids=ids, use_cache=True, logits_to_keep=1)`; the reference's
  `generate()` passes `logits_to_keep=1` itself (GenerationMixin does when `forward` accepts it), so in
  generation too the lm_head runs for one position per row on both sides.
- Stopping: ours gets `eos_token_id=[]`, the reference `eos_token_id=None` (which overrides its
  generation config's EOS) and `do_sample=False`; both outputs were checked to hold every new token, and no
  logits processor (such as `min_new_tokens`) is added to either.
- Generation time includes each library's own loop: the reference's logits processors, stopping criteria and
  cache-position bookkeeping, ours' token concatenation; the decode rows subtract a prefill of the same prompt
  timed separately, so they carry each loop's per-step overhead but not the prefill's.
- Same weights (built by ours with a fixed seed, saved, loaded by the reference in the same dtype), same torch
  thread count, one process, `torch.inference_mode()`, calls alternating.
- Pages: ours holds its large weights on transparent huge pages (`registry.hugepages`, recorded in its
  manifest), the reference where PyTorch's allocator puts them (4 KiB pages unless the process runs with
  `THP_MEM_ALLOC_ENABLE=1`, which advises huge pages for every large allocation, on both sides).
- Memory: each figure comes from a fresh process that loads the same safetensors folder (ours with
  `registry.from_pretrained`, the reference with `from_pretrained`), reads every parameter once (so weights
  mapped from the file count as loaded), then runs the case once. Peak RSS is the process's VmHWM (imports and
  loading included); working memory is the peak during the case (VmHWM reset through /proc/self/clear_refs)
  minus the RSS after loading: caches, activations, logits, and any copy of the weights a kernel packs on
  first use. `ru_maxrss` is not used: Linux carries it over fork and exec, so the children would report
  the parent's size.
"""


def report(results: list[DtypeResult], measurements: list[Machine], used: Machine, args: argparse.Namespace) -> str:
    rows = [row for result in results for row in result.rows(used)]
    shape = results[0].shape
    command = "python " + " ".join([SCRIPT, *sys.argv[1:]])
    parts = [
        "# BLOOM generation benchmark: ours against the reference, with rooflines",
        "",
        f"bloom-560m shape with random weights ({shape.layers} layers, hidden {shape.hidden}, vocabulary "
        f"{shape.vocab}, {shape.parameters:,} parameters), same weights and threads on both sides, median of "
        f"{args.prefill_rounds} (prefill) or {args.rounds} (generation) alternating calls ± standard deviation. "
        "tokens/s = batch · new tokens / seconds of one `generate` call (its prefill included); decode ms/step = "
        f"(generate seconds − a separately timed prefill of the prompt) / {args.new_tokens - 1}.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine_line()}",
        f'- reference: `transformers.BloomForCausalLM`, attn_implementation="{REFERENCE_ATTENTION}"; '
        f"ours: `registry.build` defaults ({results[0].components})",
        "",
        "## Measured limits",
        "",
        limits_table(measurements, used),
        "",
    ]
    change = drift(measurements)
    if change > 0.15:
        parts += [
            f"**The machine's limits moved by up to {change:.0%} between the start and the end of the run: "
            "it was not quiet, and the timings below are less trustworthy than their spreads suggest.**",
            "",
        ]
    parts += ["## Results", "", table(rows), ""]
    if args.plot:
        relative = os.path.relpath(args.plot, args.write.parent if args.write else Path.cwd())
        parts += [f"![tokens/s and roofline fractions]({relative})", ""]
    parts += ["## Targets (issue 5)", "", targets(rows), "", "## Checks before timing", ""]
    parts += [f"- {check}" for result in results for check in result.checks]
    parts += ["", "## Disturbance", "", DISTURBANCE, "", disturbance(results), "", FORMULAS, NOTES]
    profiles = [p for result in results for p in result.profiles]
    if profiles:
        parts += ["## Profiles of one decode step and one prefill (`--profile`)", "", *profiles, ""]
    return "\n".join(parts)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = [row for row in rows if row.kind != "decode"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.38
    for panel, chosen, value, title in (
        (left, speed, lambda row, s: row.count / s, "tokens/s (log scale; prefill: prompt tokens / time)"),
        (right, rows, lambda row, s: 100 * row.roofline.seconds / s, "% of roofline"),
    ):
        x = range(len(chosen))
        for offset, name, color in ((-width / 2, "ours", "tab:blue"), (width / 2, "reference", "tab:gray")):
            heights = [value(row, row.ours if name == "ours" else row.reference) for row in chosen]
            panel.bar([i + offset for i in x], heights, width, label=name, color=color)
        panel.set_xticks(list(x), [f"{row.case}\n{row.dtype}" for row in chosen], fontsize=7, rotation=30, ha="right")
        panel.set_title(title, fontsize=10)
    left.set_yscale("log")
    left.scatter(
        range(len(speed)),
        [row.count / row.roofline.seconds for row in speed],
        marker="_",
        s=400,
        color="black",
        label="roofline",
        zorder=3,
    )
    right.axhline(100, color="black", linewidth=0.8)
    right.axhline(80, color="tab:red", linewidth=0.8, linestyle="--", label="fp32 decode target (80%)")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def dump_json(
    results: list[DtypeResult], measurements: list[Machine], used: Machine, args: argparse.Namespace, path: Path
) -> None:
    def row_data(row: Row) -> dict[str, Any]:
        fractions = {f"{name}_fraction": row.fraction(name) for name in IMPLEMENTATIONS}
        return {**asdict(row), "speedup": row.speedup, **fractions}

    data = {
        "command": " ".join([SCRIPT, *sys.argv[1:]]),
        "machine": machine_line(),
        "limits": {"measurements": [asdict(m) for m in measurements], "used": asdict(used)},
        "samples_seconds": {f"{r.dtype}/{key}": value for r in results for key, value in r.samples.items()},
        "involuntary_context_switches": {f"{r.dtype}/{k}": v for r in results for k, v in r.switches.items()},
        "memory_bytes": {r.dtype: r.memory for r in results},
        "rows": [row_data(row) for r in results for row in r.rows(used)],
        "checks": [c for r in results for c in r.checks],
        "arguments": {k: str(v) for k, v in vars(args).items()},
    }
    path.write_text(json.dumps(data, indent=1))


# -- command line ---------------------------------------------------------------------------------


def parse_cases(text: str, args: argparse.Namespace) -> list[Case]:
    cases = []
    for name in filter(None, (part.strip() for part in text.split(","))):
        if name == "none":
            continue
        if name == "prefill":
            cases.append(Case("prefill", 1, args.prefill_len))
        elif name.startswith("generate-b") and name[len("generate-b") :].isdigit():
            cases.append(Case("generate", int(name[len("generate-b") :]), args.prompt_len, args.new_tokens))
        else:
            raise SystemExit(f"unknown case '{name}': use prefill, generate-b<batch> (e.g. generate-b8) or none")
    return cases


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default="prefill,generate-b1,generate-b8", help="or 'none' (with --profile)")
    parser.add_argument("--layers", type=int, default=None, help="n_layer (default: the preset's 24)")
    parser.add_argument("--prefill-len", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="timed generate calls per implementation and case")
    parser.add_argument("--prefill-rounds", type=int, default=10, help="timed prefill calls per implementation")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--profile", action="store_true", help="profile one batch-1 decode step and one prefill of each side"
    )
    parser.add_argument("--write", type=Path, default=None, help="write the report as markdown to this file")
    parser.add_argument("--plot", type=Path, default=None, help="save a figure (png) to this file")
    parser.add_argument("--json", type=Path, default=None, help="dump the raw samples and limits to this file")
    # a fresh process measuring one case's memory (internal)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time is generate minus prefill over new tokens - 1)")
    return args


def main() -> None:
    args = arguments()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args)
        return
    quiet_transformers()
    dtypes = args.dtypes.split(",")
    cases = parse_cases(args.cases, args)
    print(f"machine: {machine_line()}", flush=True)
    config: Any = registry.spec(PRESET).config

    def limits() -> Machine:
        return measure(dtypes, hidden=config.hidden_size, vocab=config.vocab_size, prefill_rows=args.prefill_len)

    start = limits()
    print(limits_table([start], start), "", HEADER, sep="\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        results = [run_dtype(dtype, cases, start, args, Path(tmp)) for dtype in dtypes]
    measurements = [start, limits()]
    used = start.best(measurements[1])
    text = report(results, measurements, used, args)
    print(text)
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(text)
    rows = [row for result in results for row in result.rows(used)]
    if args.plot and rows:
        plot(rows, args.plot)
    if args.json:
        dump_json(results, measurements, used, args, args.json)


if __name__ == "__main__":
    main()
