"""The ``registry`` command line: list, explain, build (a meta-device dry run), generate.

Errors print one line and exit with code 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import registry
from registry.errors import RegistryError

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class UsageError(RegistryError):
    """Malformed command-line input."""


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


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"'{pair}' is not key=value (e.g. attention=sdpa, n_layer=2)")
        out[key.strip()] = parse_value(value.strip())
    return out


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def cmd_list(args: argparse.Namespace) -> int:
    catalog = registry.catalog(load=True)
    if args.json:
        print(json.dumps(catalog, indent=2, default=str))
        return 0
    print(f"{'kind':<10} {'name':<26} {'status':<8} {'provider':<28} detail")
    for kind, records in catalog.items():
        for r in records:
            provider = f"{r['distribution'] or 'register()'} {r['version'] or ''}".strip()
            detail = r["error"] if r["status"] != "ok" else _capability_summary(r["capabilities"])
            print(f"{kind:<10} {r['name']:<26} {r['status']:<8} {provider:<28} {detail}")
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


def cmd_explain(args: argparse.Namespace) -> int:
    report = registry.explain(args.model, **parse_overrides(args.overrides))
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "text"}, indent=2))
    else:
        print(f"{report['model']} (family {report['family']})")
        print(report["text"])
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    overrides.setdefault("device", "meta")
    start = time.perf_counter()
    model = registry.build(args.model, **overrides)
    elapsed = time.perf_counter() - start
    params = model.num_parameters()
    name = model.spec.name or model.spec.family
    print(f"model      {name} (family {model.spec.family}), built on {model.device} in {elapsed * 1000:.0f} ms")
    print(f"parameters {params:,}")
    print("memory     " + ", ".join(f"{dtype}: {_human(params * size)}" for dtype, size in _BYTES.items()))
    for slot, choice in model.manifest["components"].items():
        print(f"{slot:<10} {choice['chosen'] or '(none)'}  [{choice['reason']}]")
    if args.forward:
        _tiny_forward(args.model, overrides)
    return 0


def _tiny_forward(model_name: str, overrides: dict[str, Any]) -> None:
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
    print(
        f"forward    2-layer variant ({model.num_parameters():,} parameters, random weights): "
        f"{first} {tuple(out[first].shape)} in {elapsed * 1000:.1f} ms"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    overrides = parse_overrides(args.overrides)
    from pathlib import Path

    if Path(args.model).is_dir():
        model = registry.from_pretrained(args.model, **overrides)
    else:
        model = registry.build(args.model, **overrides)
    tokenizer = getattr(model, "tokenizer", None)
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError("--prompt needs a tokenizer: pass a checkpoint folder with tokenizer files, or --ids")
        ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    elif args.ids:
        ids = torch.tensor([[int(t) for t in args.ids.split(",")]])
    else:
        raise UsageError("give --prompt TEXT or --ids 1,2,3")
    out = model.generate(ids, max_new_tokens=args.max_new_tokens)
    new = out[0, ids.shape[1] :].tolist()
    print(tokenizer.decode(new) if tokenizer is not None else " ".join(map(str, new)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="registry", description="Transformers assembled from plugins.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the catalog: every component, its status and provider")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_list)

    p = sub.add_parser("explain", help="every slot's candidates and why each is accepted or refused")
    p.add_argument("model")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser("build", help="dry run on the meta device: parameters, memory, components")
    p.add_argument("model")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--forward", action="store_true", help="also run a tiny forward on a 2-layer variant")
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("generate", help="continue a prompt")
    p.add_argument("model", help="a preset or a checkpoint folder")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--prompt")
    p.add_argument("--ids", help="comma-separated token ids, for models without a tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.set_defaults(run=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except (RegistryError, OSError) as error:
        if args.debug:
            raise
        print(f"registry: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
