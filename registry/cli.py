"""The ``registry`` command line: list, explain, build (a meta-device dry run), generate, ab.

Tables and colour on a terminal, plain text when piped; progress bars on stderr only when it is a
terminal. An error prints one line and exits with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import registry
from registry.console import Cell, Console, human_bytes
from registry.errors import RegistryError

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
EXIT_ERROR = 2


class UsageError(RegistryError):
    """Malformed command-line input."""


# -- parsing key=value ----------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """'2' -> 2, '0.1' -> 0.1, 'true' -> True, 'none' -> None, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_overrides(pairs: Sequence[str], *, option: str = "") -> dict[str, Any]:
    """``["attention=sdpa", "n_layer=2"]`` -> ``{"attention": "sdpa", "n_layer": 2}``.

    Raises:
        UsageError: an item that is not key=value, or a key given twice.
    """
    out: dict[str, Any] = {}
    where = f" in {option}" if option else ""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"'{pair}'{where} is not key=value (e.g. attention=sdpa, n_layer=2)")
        if key in out:
            raise UsageError(f"'{key}' is given twice{where}")
        out[key] = parse_value(value.strip())
    return out


def parse_variant(text: str, option: str) -> dict[str, Any]:
    """``"attention=eager,dtype=bfloat16"`` -> overrides; an empty string is no override."""
    items = [item for item in text.split(",") if item.strip()]
    return parse_overrides(items, option=option)


# -- list, explain, build -------------------------------------------------------------------------

_STATUS_STYLE = {"ok": "green", "broken": "red", "blocked": "yellow"}


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    catalog = registry.catalog(load=True)
    if args.json:
        console.print(json.dumps(catalog, indent=2, default=str))
        return 0
    rows: list[list[Cell]] = []
    for kind, records in catalog.items():
        for r in records:
            provider = f"{r['distribution'] or 'register()'} {r['version'] or ''}".strip()
            detail = r["error"] if r["status"] != "ok" else _capability_summary(r["capabilities"])
            rows.append([kind, r["name"], (r["status"], _STATUS_STYLE.get(r["status"], "")), provider, detail])
    console.print(console.table(["kind", "name", "status", "provider", "capabilities"], rows))
    from registry import fused

    kernels: list[list[Cell]] = [
        [name, (state, "green" if state == "ready" else "")] for name, state in fused.kernels().items()
    ]
    console.print("")
    console.print(console.style("CPU kernels for linear layers (registry.fused; see docs/architecture.md)", "bold"))
    console.print(console.table(["kernel", "status"], kernels))
    return 0


def _capability_summary(caps: dict[str, Any] | None) -> str:
    if not caps:
        return ""
    shown = []
    for key, value in caps.items():
        if value in (None, False, [], ()) or key == "priority":
            continue
        shown.append(
            key if value is True else f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}"
        )
    return "; ".join(shown)


def cmd_explain(args: argparse.Namespace, console: Console) -> int:
    report = registry.explain(args.model, **parse_overrides(args.overrides))
    if args.json:
        console.print(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2))
        return 0
    console.print(console.style(f"{report['model']} (family {report['family']})", "bold"))
    rows: list[list[Cell]] = []
    for slot, choice in report["slots"].items():
        for c in choice["candidates"]:
            chosen = c["name"] == choice["chosen"]
            verdict: Cell = (
                ("chosen", "green+bold") if chosen else ("accepted", "") if c["accepted"] else ("refused", "red")
            )
            why = choice["reason"] if chosen else "; ".join(c["reasons"]) or "-"
            rows.append([slot, c["name"], verdict, why])
        if not choice["candidates"] or choice["chosen"] is None:
            rows.append([slot, "(none)", ("unfilled", "yellow"), choice["reason"]])
    console.print(console.table(["slot", "candidate", "verdict", "why"], rows))
    return 0


def cmd_build(args: argparse.Namespace, console: Console) -> int:
    overrides = parse_overrides(args.overrides)
    overrides.setdefault("device", "meta")
    start = time.perf_counter()
    model = registry.build(args.model, **overrides)
    elapsed = time.perf_counter() - start
    params = model.num_parameters()
    name = model.spec.name or model.spec.family
    memory = ", ".join(f"{dtype}: {human_bytes(params * size)}" for dtype, size in _BYTES.items())
    facts = [
        ["model", f"{name} (family {model.spec.family}), built on {model.device} in {elapsed * 1000:.0f} ms"],
        ["parameters", f"{params:,}"],
        ["memory", memory],
    ]
    console.print(console.table(["", ""], facts, header=False))
    console.print()
    rows: list[list[Cell]] = [
        [slot, (choice["chosen"] or "(none)", "cyan"), choice["reason"]]
        for slot, choice in model.manifest["components"].items()
    ]
    console.print(console.table(["slot", "component", "why"], rows))
    if args.forward:
        console.print()
        console.print(_tiny_forward(args.model, overrides))
    return 0


def _tiny_forward(model_name: str, overrides: dict[str, Any]) -> str:
    """A real forward on a two-layer, narrow variant with random weights: checks the assembly runs."""
    import torch

    small = {k: v for k, v in overrides.items() if k != "device"}
    spec = registry.spec(model_name, **small)
    config = spec.config
    heads = int(getattr(config, "n_head", None) or getattr(config, "num_attention_heads", None) or 4)
    width = {k: v for k, v in {"n_layer": 2, "num_hidden_layers": 2}.items() if k in type(config).model_fields}
    hidden = {"hidden_size": 16 * heads} if "hidden_size" in type(config).model_fields else {}
    model = registry.build(spec, device="cpu", **width, **hidden)
    vocab = getattr(config, "vocab_size", 100)
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids)
    elapsed = time.perf_counter() - start
    first = out.keys()[0]
    return (
        f"forward    2-layer variant ({model.num_parameters():,} parameters, random weights): "
        f"{first} {tuple(out[first].shape)} in {elapsed * 1000:.1f} ms"
    )


# -- generate ---------------------------------------------------------------------------------------

_GENERATE_OPTIONS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")


def _load(model: str, overrides: dict[str, Any]) -> Any:
    if Path(model).is_dir():
        return registry.from_pretrained(model, **overrides)
    return registry.build(model, **overrides)


class _TextStream:
    """Prints new text as tokens arrive: decodes everything so far and writes what is new, holding
    back an incomplete UTF-8 sequence (a byte-level token may be half a character)."""

    def __init__(self, console: Console, tokenizer: Any):
        self.console, self.tokenizer = console, tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, tokens: Any) -> None:
        self.ids.append(int(tokens[0]))
        if self.tokenizer is None:
            self.console.out.write(("" if len(self.ids) == 1 else " ") + str(self.ids[-1]))
        else:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                return
            self.console.out.write(text[len(self.shown) :])
            self.shown = text
        self.console.out.flush()

    def finish(self) -> None:
        if self.tokenizer is not None:
            self.console.out.write(self.tokenizer.decode(self.ids, skip_special_tokens=True)[len(self.shown) :])
        self.console.out.write("\n")
        self.console.out.flush()


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    import torch

    options = {k: getattr(args, k) for k in _GENERATE_OPTIONS if getattr(args, k) is not None}
    overrides = parse_overrides(args.overrides)
    model = _load(args.model, overrides)
    tokenizer = model.tokenizer
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError(
                "--prompt needs a tokenizer: pass a checkpoint folder with tokenizer files, or give --ids 1,2,3"
            )
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    elif args.ids:
        try:
            ids = torch.tensor([[int(t) for t in args.ids.split(",")]])
        except ValueError:
            raise UsageError(f"--ids '{args.ids}' is not comma-separated integers (e.g. --ids 1,2,3)") from None
    else:
        raise UsageError("give --prompt TEXT or --ids 1,2,3")
    stream = _TextStream(console, tokenizer)
    model.generate(ids, streamer=stream, **options)
    stream.finish()
    return 0


# -- ab ---------------------------------------------------------------------------------------------


_AB_OPTIONS = ("repeats", "new_tokens", "tolerance", "seed", "inputs", "progress")


class _ProgressBars:
    """Turns ``registry.ab``'s ``progress(stage, done, total)`` calls into one bar per stage."""

    _LABELS = {"build": "building", "memory": "warm-up + memory", "numerics": "numerics", "repeats": "timing"}

    def __init__(self, console: Console):
        self.console = console
        self.bar: Any = None
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = self.console.progress(self._LABELS.get(stage, stage), total).__enter__()
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def cmd_ab(args: argparse.Namespace, console: Console) -> int:
    a = parse_variant(args.a, "--a")
    b = parse_variant(args.b, "--b")
    shared = parse_overrides(args.overrides)
    options_named = [k for k in shared if k in _AB_OPTIONS]
    if options_named:
        flag = "--" + options_named[0].replace("_", "-")
        raise UsageError(f"'{options_named[0]}' is an option of ab, not an override: use {flag}")
    options: dict[str, Any] = {"repeats": args.repeats, "new_tokens": args.new_tokens, "seed": args.seed}
    if args.tolerance is not None:
        options["tolerance"] = args.tolerance
    bars = _ProgressBars(console)
    try:
        report = registry.ab(args.model, a, b, progress=bars, **options, **shared)
    finally:
        bars.close()
    _print_report(console, report)
    written = _write_outputs(args, report)
    for path in written:
        console.print(f"wrote {path}")
    return 0


def _write_outputs(args: argparse.Namespace, report: Any) -> list[str]:
    written = []
    if args.json:
        Path(args.json).write_text(report.to_json() + "\n")
        written.append(args.json)
    if args.report:
        Path(args.report).write_text(report.to_markdown())
        written.append(args.report)
    if args.plot:
        report.plot(args.plot)
        written.append(args.plot)
    return written


def _print_report(console: Console, report: Any) -> None:
    verdict = report.verdict
    console.print(console.style(f"A/B {report.a['model']}: {report.a['label']} vs {report.b['label']}", "bold"))
    console.print(f"weights: {report.a['weights']['source']}")
    console.print(
        f"inputs:  {report.numerics['inputs']}; tolerance {verdict.tolerance:.0e} ({verdict.tolerance_source})"
    )
    for title, headers, rows in report.sections():
        if not rows:
            continue
        console.print()
        console.print(console.style(title, "bold"))
        console.print(console.table(headers, [_styled(row) for row in rows], indent=2))
    console.print()
    colour = "green+bold" if verdict.matches else "red+bold"
    console.print(console.style("verdict: ", "bold") + console.style(verdict.summary, colour))


def _styled(row: list[str]) -> list[Cell]:
    marks = {"DIVERGES": "red+bold", "over": "red", "ok": "green", "a": "cyan", "b": "cyan"}
    return [(cell, marks[cell]) if cell in marks else cell for cell in row]


# -- the parser and main ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line and exit code 2, like every other error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_overrides(parser: argparse.ArgumentParser, help: str = "a slot, a spec field, dtype or device") -> None:
    parser.add_argument("overrides", nargs="*", default=[], metavar="key=value", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="registry", description="Transformers assembled from plugins.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = _Parser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser(
        "list", parents=[common], help="the catalog: every component, its status, provider and capabilities"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("explain", parents=[common], help="every slot's candidates and why each is accepted or refused")
    p.add_argument("model")
    _add_overrides(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("build", parents=[common], help="dry run on the meta device: parameters, memory, components")
    p.add_argument("model")
    _add_overrides(p)
    p.add_argument("--forward", action="store_true", help="also run a tiny forward on a 2-layer variant")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("generate", parents=[common], help="continue a prompt, streaming the new tokens")
    p.add_argument("model", help="a preset or a checkpoint folder")
    _add_overrides(p)
    p.add_argument("--prompt", help="text (needs a checkpoint folder with tokenizer files)")
    p.add_argument("--ids", help="comma-separated token ids, for models without a tokenizer")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(run=cmd_generate)

    p = sub.add_parser(
        "ab", parents=[common], help="A/B two variants on the same weights: numerics, speed, memory, verdict"
    )
    p.add_argument("model", help="a preset (random weights), spec file or checkpoint folder")
    _add_overrides(p, "overrides shared by A and B (e.g. n_layer=2)")
    p.add_argument("--a", default="", metavar="key=value[,...]", help="what makes variant A (default: as built)")
    p.add_argument("--b", default="", metavar="key=value[,...]", help="what makes variant B")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (default 5)")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to generate (default 8)")
    p.add_argument("--tolerance", type=float, help="relative tolerance (default: by dtype)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, inputs and bootstrap")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--report", metavar="FILE.md", help="write the report as Markdown")
    p.add_argument("--plot", metavar="FILE.png", help="plot per-layer differences and latencies (matplotlib)")
    p.set_defaults(run=cmd_ab)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides follow options too (``ab MODEL --a x=1 n_layer=2``):
    argparse takes positionals in one run, so later ones come back as extras."""
    args, extra = parser.parse_known_args(argv)
    stray = [item for item in extra if item.startswith("-") or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, RegistryError | OSError) else f"{type(error).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return its exit code (0, or 2 on any error)."""
    parser = build_parser()
    try:
        args = _parse(parser, argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, already printed as one line)
        return int(stop.code or 0)
    console = Console()
    try:
        return int(args.run(args, console))
    except KeyboardInterrupt:
        print("registry: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (registry list | head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as error:  # one line, never a traceback: --debug shows it
        if args.debug:
            raise
        hint = "" if isinstance(error, RegistryError | OSError) else " (run with --debug for the traceback)"
        print(f"registry: error: {_one_line(error)}{hint}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
