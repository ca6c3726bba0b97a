"""The command line: README's main command, and bad input as one line with exit code 2."""

from __future__ import annotations

import json

import pytest

from registry.cli import main, parse_value


def test_build_dry_run_with_tiny_forward(capsys):
    assert main(["build", "bloom-7b1", "attention=sdpa", "--forward"]) == 0
    out = capsys.readouterr().out
    assert "parameters 7,069,016,064" in out
    assert "attention  sdpa  [requested]" in out
    assert "forward    2-layer variant" in out and "logits (2, 8, 250880)" in out


def test_list_and_explain(capsys):
    assert main(["list", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    assert any(r["name"] == "sdpa" and r["status"] == "ok" for r in catalog["attention"])
    assert main(["explain", "bloom-560m", "attention=eager"]) == 0
    out = capsys.readouterr().out
    assert "attention: eager  [requested]" in out and "+ sdpa: accepted" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["build", "bloom-9000"], "model 'bloom-9000' is not a preset"),
        (["build", "bloom-560m", "attention=spda"], "did you mean 'sdpa'"),
        (["build", "bloom-560m", "n_layers=2"], "unknown override 'n_layers'"),
        (["build", "bloom-560m", "oops"], "'oops' is not key=value"),
        (["explain", "bloom-560m", "hidden_size=100", "n_head=3"], "must be divisible by n_head"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_values_are_parsed():
    assert [parse_value(v) for v in ["2", "0.5", "true", "None", "sdpa"]] == [2, 0.5, True, None, "sdpa"]
