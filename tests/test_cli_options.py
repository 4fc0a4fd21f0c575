"""The engine options, defined once: `screen` and `serve` take the same flags, and the gate's config file
accepts the same values (a Triton URL as the backend, among them)."""

from __future__ import annotations

import argparse

import pytest

from safeclip.runtime.cli_options import PRECISION_CHOICES, add_engine_arguments, parse_thresholds
from safeclip.runtime.server.cli import _FLAG_KEYS, build_parser, overrides
from safeclip.runtime.server.config import load_config

TRITON = "triton://127.0.0.1:8001"


def engine_flags() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return {a.dest: a for a in parser._actions if a.dest != "help"}


def serve_config(*argv: str, path=None):
    args = build_parser().parse_args(["--engine", "e", "--upstream", "http://127.0.0.1:1", *argv])
    return load_config(path, overrides(args, {}))


def test_serve_has_every_engine_flag_and_maps_it_onto_the_config():
    serve = {a.dest: a for a in build_parser()._actions}
    for dest, action in engine_flags().items():
        assert dest in serve and dest in _FLAG_KEYS, dest
        assert (serve[dest].type, serve[dest].choices) == (action.type, action.choices), dest


def test_serve_accepts_a_triton_backend_from_a_flag_or_the_file(tmp_path):
    assert serve_config("--backend", TRITON).backend == TRITON
    path = tmp_path / "gate.toml"
    path.write_text(f'backend = "{TRITON}"\n')
    assert serve_config(path=path).backend == TRITON
    assert serve_config("--backend", "cpu", path=path).backend == "cpu"  # the flag wins


def test_a_bad_backend_is_refused_naming_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--backend", "tritonn://h:1"])
    assert "or a triton:// URL, got 'tritonn://h:1'" in capsys.readouterr().err
    path = tmp_path / "gate.toml"
    path.write_text('backend = "gpu"\n')
    with pytest.raises(ValueError, match=r"backend: expected one of .* got 'gpu'"):
        serve_config(path=path)


@pytest.mark.parametrize("argv", [["--threshold", "0.5", "--thresholds", "gun=0.4"], ["--precision", "trt"]])
def test_screen_and_serve_refuse_the_same_flags(argv, capsys):
    screen = argparse.ArgumentParser()
    add_engine_arguments(screen)
    for parser, extra in ((screen, ["--engine", "e"]), (build_parser(), [])):
        with pytest.raises(SystemExit):
            parser.parse_args(extra + argv)
        assert capsys.readouterr().err


def test_serve_flags_keep_the_files_values_unless_given(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text('precision = "fp16"\ndisabled = ["gun"]\n[batch]\nsize = 4\n[limits]\nmax_pixels = 1000\n')
    config = serve_config(path=path)
    assert (config.precision, config.disabled, config.batch.size, config.limits.max_pixels) == (
        "fp16",
        ("gun",),
        4,
        1000,
    )
    config = serve_config(
        "--precision", "int8", "--disable", "knife, blood", "--batch-size", "2", "--max-pixels", "9", path=path
    )
    assert (config.precision, config.disabled, config.batch.size, config.limits.max_pixels) == (
        "int8",
        ("knife", "blood"),
        2,
        9,
    )


def test_precision_choices_are_the_onnx_artifacts():
    assert PRECISION_CHOICES == ("fp32", "fp16", "int8")


def test_parse_thresholds():
    assert parse_thresholds("gun=0.5, insulting gesture=0.7,") == {"gun": 0.5, "insulting gesture": 0.7}
    for bad in ("gun", "=0.5", "gun=x"):
        with pytest.raises(argparse.ArgumentTypeError, match="CATEGORY=THRESHOLD"):
            parse_thresholds(bad)
