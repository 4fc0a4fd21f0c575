"""Options defined once (options.py): `screen` and `serve` take the same engine flags, the gate's config
file accepts the same values (a Triton URL as the backend, among them), every flag of `serve` is a config
key, and each help text states the default the code has."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from safeclip.runtime.cli_options import ENGINE_OPTIONS, PRECISION_CHOICES, add_engine_arguments, parse_thresholds
from safeclip.runtime.server.cli import FLAGS, build_parser, overrides
from safeclip.runtime.server.config import REFERENCE_END, REFERENCE_START, GateConfig, load_config, options, reference

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
    declared = {path: option for path, option in options()}
    for dest, action in engine_flags().items():
        path, option = FLAGS[dest]
        assert dest in serve and declared[path] is option and option in ENGINE_OPTIONS, dest
        assert serve[dest].choices == action.choices, dest
        assert serve[dest].help.startswith(option.help) and action.help.startswith(option.help), dest


def test_every_serve_flag_but_config_and_log_level_is_a_config_key():
    """The flags come from the config's declarations: none is handled on the side."""
    flags = {a.dest for a in build_parser()._actions} - {"help", "config", "log_level"}
    assert flags == set(FLAGS)
    default = GateConfig()
    for dest, (path, option) in FLAGS.items():
        value = default
        for key in path:
            value = getattr(value, key)
        assert value == option.default, dest  # the dataclass's default is the one the help shows


def test_help_shows_the_declared_default():
    text = build_parser().format_help()
    assert "(default: 400000000)" in " ".join(text.split())  # --max-request-pixels (its help said 128,000,000)
    screen = argparse.ArgumentParser()
    add_engine_arguments(screen)
    assert screen.parse_args(["--engine", "e"]).batch_size == ENGINE_OPTIONS[-2].default
    assert "(default: 32)" in " ".join(screen.format_help().split())


def test_a_flag_is_checked_by_the_rule_of_its_key(capsys):
    screen = argparse.ArgumentParser()
    add_engine_arguments(screen)
    for parser, argv in ((screen, ["--engine", "e", "--batch-size", "0"]), (build_parser(), ["--max-images", "0"])):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--max-images", "many"])
    assert "--max-images: expected integer >= 1, got 'many'" in capsys.readouterr().err
    for parser, argv, message in (
        (screen, ["--engine", "e", "--thresholds", "gun=2"], "argument --thresholds: gun: must be in [0, 1], got 2.0"),
        (build_parser(), ["--allow", "10.0.0.300/8"], "argument --allow: '10.0.0.300/8' is not a CIDR"),
        (build_parser(), ["--upstream", "ftp://h"], "argument --upstream: expected an http(s)://host:port URL"),
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert message in capsys.readouterr().err


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


def test_the_readme_config_reference_is_the_declarations():
    """The README's table is generated: a key added, renamed or given another default fails here until the
    README's block is replaced by the output of `python -m safeclip.runtime.server.config`."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END) + len(REFERENCE_END)
    assert readme[start:end] + "\n" == reference(), "regenerate: python -m safeclip.runtime.server.config"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[limits]\nmax_imgs = 3",
            "[limits]: unknown key(s) ['max_imgs']; known: ['decode_timeout', 'max_body_bytes', ",
        ),
        ("[limit]\nmax_images = 3", "unknown top-level key(s) ['limit']; known: ["),
        ("limits = 3", "limits: expected a table ([limits]), got 3"),
        ('[batch]\nsize = "8"', "batch.size: expected an integer, got '8'"),
        ("[forward]\nlong_edge = 0", "forward.long_edge: must be >= 1, got 0"),
        ("[proxy]\nallow_audio = 1", "proxy.allow_audio: expected true or false, got 1"),
        ('[thresholds]\ngun = "high"', "thresholds.gun: expected a number, got 'high'"),
    ],
)
def test_file_errors_name_the_file_the_section_and_the_key(tmp_path, text, message):
    path = tmp_path / "gate.toml"
    path.write_text('engine = "e"\n' + text + "\n")
    with pytest.raises(ValueError) as e:
        load_config(path, {})
    assert str(e.value).startswith(f"{path}: {message}")
