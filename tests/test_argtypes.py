"""Numeric arguments are checked when parsed (#14 class 3): every numeric option of every
script refuses NaN, infinities and values outside its range in one line naming the option,
exit 2, before any work. ``--lr nan`` trained to NaN weights and saved them; ``--S 0``,
``--dropout 1.5``, ``test.py --iou 0`` (after all inference) ended in tracebacks.

The options are not listed by hand: each script's parser is captured as the script builds
it, and every option whose type is an argtypes checker is tried with values outside its
``bounds``; a numeric option with a plain ``int``/``float`` type fails the test.
"""
from __future__ import annotations

import argparse
import importlib
import math

import pytest

import argtypes
import utils

SCRIPTS = ["train", "darknet_train", "darknet_train_multigpu", "darknet_train_multigpu_distr", "test",
           "detect", "detect_txt", "export", "evaluate", "analyze", "voc_convert", "darknet_convert",
           "synthetic"]


class Captured(Exception):
    pass


def parser_of(script: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``script``'s main() builds, taken when it parses."""
    module = importlib.import_module(script)
    seen = []

    def capture(self, *args, **kwargs):
        seen.append(self)
        raise Captured
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        with pytest.raises(Captured):
            module.main([])
    return seen[0]


def invalid_values(check) -> list[str]:
    lo, hi, lo_open, hi_open = check.bounds
    integer = check.__name__.startswith("int")
    values = ["x"] if integer else ["nan", "inf", "-inf", "x"]
    if lo is not None:
        values.append(str(lo if lo_open else (lo - 1 if integer else lo - 0.5)))
    if hi is not None:
        values.append(str(hi if hi_open else hi + 0.5))
    return values


def numeric_options(script: str, monkeypatch):
    parser = parser_of(script, monkeypatch)
    options = []
    for action in parser._actions:
        if action.type in (int, float):
            pytest.fail(f"{script}.py {action.option_strings}: a plain {action.type.__name__}, not an argtypes checker")
        if hasattr(action.type, "bounds") and action.option_strings:
            options.append((action.option_strings[-1], action.type))
    return options


def test_argtypes_ranges_by_hand():
    dropout = argtypes.fraction(0, 1, hi_open=True)
    assert dropout("0") == 0.0 and dropout("0.999") == 0.999
    for bad in ("1", "1.5", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            dropout(bad)
    assert argtypes.positive_int("3") == 3
    for bad in ("0", "-1", "1.5", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            argtypes.positive_int(bad)
    assert argtypes.nonneg_float("0") == 0.0 and math.isinf(float("inf"))
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number, got 'inf'"):
        argtypes.nonneg_float("inf")


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_option_refuses_bad_values_in_one_line(script, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)  # a script that did work would leave something here
    module = importlib.import_module(script)
    options = numeric_options(script, monkeypatch)
    for flag, check in options:
        for value in invalid_values(check):
            with pytest.raises(SystemExit) as exc:
                utils.run_cli(module.main, [f"{flag}={value}"])
            err = capsys.readouterr().err
            assert exc.value.code == 2, (flag, value, err)
            assert err.count("\n") == 1 and err.startswith(f"error: {flag} must "), (flag, value, err)
    assert not any(tmp_path.iterdir())


def test_the_issues_examples_are_all_covered(monkeypatch):
    """#14's list: each of these options exists and is range-checked in its script."""
    found = {script: dict(numeric_options(script, monkeypatch)) for script in ("train", "test")}
    for flag in ("--lr", "--gamma", "--weight-decay", "--width", "--hidden", "--S", "--B", "--dropout",
                 "--momentum", "--poly-power"):
        assert flag in found["train"], flag
    assert "--iou" in found["test"]
