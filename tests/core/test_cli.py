"""The command line: every subcommand, tables and colour only on a terminal, streaming generation, and
bad input as one line with exit code 2."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch

import registry
from registry.cli import main, parse_value, parse_variant
from registry.console import Console
from registry.model import AssembledModel
from tests.tokenizers.make_bloom_tokenizer import make_bloom_tokenizer

TINY = ["n_layer=2", "hidden_size=32", "n_head=4", "vocab_size=1000"]
ANSI = re.compile(r"\x1b\[")


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Writes(io.StringIO):
    """A stream that keeps every write() separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny BLOOM checkpoint folder with tokenizer files."""
    folder = tmp_path_factory.mktemp("bloom-cli")
    torch.manual_seed(0)
    make_bloom_tokenizer(folder)
    vocab = len(registry.tokenizer(str(folder)))
    registry.build("bloom-560m", n_layer=2, hidden_size=32, n_head=4, vocab_size=vocab).save_pretrained(folder)
    return folder


def lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in text.splitlines()]


def test_build_dry_run_with_tiny_forward(capsys):
    assert main(["build", "bloom-7b1", "attention=sdpa", "--forward"]) == 0
    out = lines(capsys.readouterr().out)
    assert "parameters 7,069,016,064" in out
    assert "memory float32: 26.3 GiB, bfloat16: 13.2 GiB, float16: 13.2 GiB" in out
    assert "attention sdpa requested" in out and "position alibi auto: family 'bloom' default" in out
    assert any(line.startswith("forward 2-layer variant") and "logits (2, 8, 250880)" in line for line in out)


def test_list_is_a_plain_table_when_piped(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert not ANSI.search(out)
    table = lines(out)
    assert table[0] == "kind name status provider capabilities"
    assert any(line.startswith("attention sdpa ok registry-transformers") for line in table)
    from registry import fused

    kernels = table[table.index("kernel status") + 1 :]
    assert kernels == [f"{name} {state}" for name, state in fused.kernels().items()]
    assert main(["list", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "sdpa" and r["status"] == "ok" for r in catalog["attention"])


def test_explain_shows_every_candidate_and_why(capsys):
    assert main(["explain", "bloom-560m", "attention=eager"]) == 0
    out = lines(capsys.readouterr().out)
    assert out[0] == "bloom-560m (family bloom)" and out[1] == "slot candidate verdict why"
    assert "attention eager chosen requested" in out and "attention sdpa accepted -" in out
    assert "position absolute refused needs config field(s) max_position_embeddings, which family 'bloom' lacks" in out


def test_ab_prints_the_report_and_writes_json_markdown_and_plot(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    files = {"--json": tmp_path / "ab.json", "--report": tmp_path / "ab.md", "--plot": tmp_path / "ab.png"}
    argv = ["ab", "bloom-560m", "--a", "attention=eager", "--b", "attention=sdpa", *TINY]
    argv += ["--repeats", "2", "--new-tokens", "3"] + [str(x) for pair in files.items() for x in pair]
    assert main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert not ANSI.search(out) and captured.err == ""  # no colour and no progress bars when piped
    assert out.startswith("A/B bloom-560m: A (attention=eager) vs B (attention=sdpa)\nweights: random (seed 0")
    for title in ("Variants", "Outputs", "Agreement", "Layers", "Speed", "Memory"):
        assert f"\n{title}\n" in out
    assert re.search(r"\nverdict: B matches A within 1e-04 \(max relative difference \d\.\de-\d\d\)", out)
    data = json.loads(files["--json"].read_text())
    assert set(data) == {"a", "b", "numerics", "speed", "memory", "verdict"}
    assert data["a"]["overrides"] == {"attention": "eager"} and data["verdict"]["matches"] is True
    assert data["a"]["components"]["attention"] == "eager" and data["b"]["components"]["attention"] == "sdpa"
    assert files["--report"].read_text().startswith("# A/B: bloom-560m")
    assert files["--plot"].read_bytes()[:4] == b"\x89PNG"
    assert [f"wrote {files[k]}" for k in files] == out.strip().splitlines()[-3:]


def test_ab_on_a_checkpoint_folder_draws_progress_on_a_terminal(checkpoint, monkeypatch):
    out, err = io.StringIO(), Terminal()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    argv = ["ab", str(checkpoint), "--b", "attention=eager,dtype=bfloat16", "--repeats", "2", "--new-tokens", "2"]
    assert main(argv) == 0
    assert "building [" in err.getvalue() and "timing [########################] 2/2" in err.getvalue()
    out = out.getvalue()
    assert f"weights: checkpoint {checkpoint}" in out and "A (as built) vs B (attention=eager, dtype=bfloat16)" in out
    assert "tolerance 5e-02 (default for float32 vs bfloat16)" in out


def test_generate_from_ids(capsys):
    assert main(["generate", "bloom-560m", *TINY, "--ids", "5,6,7", "--max-new-tokens", "4"]) == 0
    tokens = capsys.readouterr().out.split()
    assert len(tokens) == 4 and all(0 <= int(t) < 1000 for t in tokens)


def test_generate_streams_text_as_it_is_produced(checkpoint, monkeypatch):
    out = Writes()
    monkeypatch.setattr("sys.stdout", out)
    argv = ["generate", str(checkpoint), "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--seed", "1"]
    assert main(argv) == 0
    model = registry.from_pretrained(checkpoint)
    expected = model.generate("The quick brown fox", max_new_tokens=6)
    assert expected and out.getvalue() == expected + "\n"
    assert len(out.writes) > 2  # the text arrives in pieces as tokens are made, then a newline


def test_generate_passes_only_the_options_given(monkeypatch, capsys):
    seen = {}

    def fake_generate(self, ids, **options):
        seen.update(options)
        options["streamer"](ids[:, -1])
        return ids

    monkeypatch.setattr(AssembledModel, "generate", fake_generate)
    argv = ["generate", "bloom-560m", *TINY, "--ids", "5,6", "--top-p", "0.9", "--do-sample", "--seed", "3"]
    assert main(argv) == 0
    assert set(seen) == {"streamer", "top_p", "do_sample", "seed"}
    assert (seen["top_p"], seen["do_sample"], seen["seed"]) == (0.9, True, 3)
    assert capsys.readouterr().out == "6\n"


UNKNOWN_ATTENTION = "attention 'nope' is unknown; available: eager, fused-decode, sdpa"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["build", "bloom-9000"], "model 'bloom-9000' is not a preset"),
        (["explain", "bloom-9000"], "model 'bloom-9000' is not a preset"),
        (["generate", "bloom-9000", "--ids", "1"], "model 'bloom-9000' is not a preset"),
        (["ab", "bloom-9000", "--b", "attention=sdpa"], "model 'bloom-9000' is not a preset"),
        (["build", "bloom-560m", "attention=spda"], "did you mean 'sdpa'"),
        (["explain", "bloom-560m", "attention=nope"], UNKNOWN_ATTENTION),
        (["ab", "bloom-560m", "--b", "attention=nope"], UNKNOWN_ATTENTION),
        (["ab", "bloom-560m", "--a", "attention"], "'attention' in --a is not key=value"),
        (["ab", "bloom-560m", "--b", "attention=sdpa,n_layer"], "'n_layer' in --b is not key=value"),
        (["ab", "bloom-560m", "--b", "attention=sdpa", "oops"], "'oops' is not key=value"),
        (["ab", "bloom-560m", "--b", "attention=sdpa", "n_layers=2"], "unknown override 'n_layers'"),
        (["ab", "bloom-560m", "--repeats", "1", *TINY], "repeats must be >= 2"),
        (["ab", "bloom-560m", "repeats=3"], "'repeats' is an option of ab, not an override: use --repeats"),
        (["ab", "bloom-560m", "--repeats", "many"], "argument --repeats: invalid int value: 'many'"),
        (["ab"], "the following arguments are required: model"),
        (["build", "bloom-560m", "n_layers=2"], "unknown override 'n_layers'"),
        (["build", "bloom-560m", "oops"], "'oops' is not key=value"),
        (["explain", "bloom-560m", "hidden_size=100", "n_head=3"], "must be divisible by n_head"),
        (["generate", "bloom-560m", *TINY, "--prompt", "hi"], "--prompt needs a tokenizer"),
        (["generate", "bloom-560m", *TINY, "--ids", "1,x"], "--ids '1,x' is not comma-separated integers"),
        (["list", "extra"], "unrecognized arguments: extra"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("registry")


def test_help_exits_with_0(capsys):
    assert main(["ab", "--help"]) == 0
    assert "--a key=value[,...]" in capsys.readouterr().out


def test_debug_shows_the_traceback():
    with pytest.raises(registry.UnknownPresetError):
        main(["--debug", "build", "bloom-9000"])
    with pytest.raises(registry.UnknownPresetError):
        main(["build", "bloom-9000", "--debug"])


def test_values_and_variants_are_parsed():
    assert [parse_value(v) for v in ["2", "0.5", "true", "None", "sdpa"]] == [2, 0.5, True, None, "sdpa"]
    assert parse_variant("attention=eager, dtype=bfloat16", "--a") == {"attention": "eager", "dtype": "bfloat16"}
    assert parse_variant("", "--a") == {}


def test_list_in_colour_on_a_terminal(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    terminal = Terminal()
    monkeypatch.setattr("sys.stdout", terminal)
    assert main(["list"]) == 0
    out = terminal.getvalue()
    assert "\x1b[32mok\x1b[0m" in out and "\x1b[1mkind" in out


def test_colour_only_on_a_terminal_and_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    table = [["sdpa", ("ok", "green")]]
    assert "\x1b[32mok\x1b[0m" in Console(out=Terminal()).table(["name", "status"], table)
    assert not ANSI.search(Console(out=io.StringIO()).table(["name", "status"], table))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(Console(out=Terminal()).table(["name", "status"], table))


def test_progress_bars_only_on_a_terminal():
    err = Terminal()
    with Console(err=err).progress("timing", 4) as bar:
        bar.update(2)
    assert "timing [############............] 2/4" in err.getvalue() and err.getvalue().endswith("\r\x1b[K")
    quiet = io.StringIO()
    with Console(err=quiet).progress("timing", 4) as bar:
        bar.update(2)
    assert quiet.getvalue() == ""
