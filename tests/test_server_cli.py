"""`safeclip serve` as a command: flags over the config file, exit statuses, a real process."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from safeclip.runtime.server.cli import build_parser, main, overrides
from safeclip.runtime.server.config import load_config
from server_helpers import data_url, gate_process, http, png, post_json, user_message


def test_flags_override_the_file_and_the_key_comes_from_the_environment(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text(
        'engine = "engines/a"\nupstream = "http://127.0.0.1:8000"\naction = "inject"\n'
        '[limits]\nmax_images = 4\nmax_body_bytes = 1000\n[actions]\ngun = "refuse"\n'
    )
    args = build_parser().parse_args(
        [
            "--config",
            str(path),
            "--action",
            "monitor",
            "--max-images",
            "2",
            "--actions",
            "insulting gesture=inject",
            "--allow",
            "10.0.0.0/8",
            "--no-fail-open",
            "--disable",
            "alcohol,cigarette",
        ]
    )
    config = load_config(args.config, overrides(args, {"SAFECLIP_API_KEY": "from-env"}))
    assert (config.action, config.limits.max_images, config.limits.max_body_bytes) == ("monitor", 2, 1000)
    assert config.actions == {"gun": "refuse", "insulting gesture": "inject"}
    assert [str(n) for n in config.fetch.allow] == ["10.0.0.0/8"]
    assert config.disabled == ("alcohol", "cigarette") and config.fail_open is False
    assert config.api_key == "from-env" and "from-env" not in repr(config)
    flagged = load_config(
        None,
        overrides(
            build_parser().parse_args(["--engine", "e", "--upstream", "http://h:1", "--api-key", "flag"]),
            {"SAFECLIP_API_KEY": "env"},
        ),
    )
    assert flagged.api_key == "flag"


def test_upstream_key_comes_from_the_flag_or_the_environment_never_the_file(tmp_path):
    argv = ["--engine", "e", "--upstream", "https://api.example.com/openai/"]
    from_env = load_config(None, overrides(build_parser().parse_args(argv), {"SAFECLIP_UPSTREAM_API_KEY": "sk-env"}))
    assert from_env.upstream_api_key == "sk-env" and "sk-env" not in repr(from_env)
    assert from_env.upstream == "https://api.example.com/openai"
    flag = build_parser().parse_args([*argv, "--upstream-api-key", "sk-flag"])
    assert load_config(None, overrides(flag, {"SAFECLIP_UPSTREAM_API_KEY": "sk-env"})).upstream_api_key == "sk-flag"
    path = tmp_path / "gate.toml"
    path.write_text('engine = "e"\nupstream = "http://h:1"\nupstream_api_key = "sk-file"\n')
    with pytest.raises(ValueError, match="upstream_api_key is not read from files; use --upstream-api-key"):
        load_config(path, {})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--upstream", "http://h:1"], "engine is required"),
        (["--engine", "e", "--upstream-api-key", "sk-provider"], "no upstream"),
        (["--engine", "e", "--upstream", "http://h:1/v1"], "without /v1"),
        (["--engine", "e", "--upstream", "http://h:1", "--max-images", "0"], "must be >= 1"),
    ],
)
def test_bad_configuration_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_category_action_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--actions", "gun=block"])
    assert e.value.code == 2 and "CATEGORY=ACTION" in capsys.readouterr().err


def test_serve_process_runs_until_sigterm(tiny_engine, tmp_path, upstream_server, upstream):
    config = tmp_path / "gate.toml"
    config.write_text(f'engine = "{tiny_engine}"\nupstream = "{upstream_server[1]}"\nthreshold = 0.0\n')
    with gate_process("--config", str(config), "--backend", "cpu") as gate:
        assert http("GET", f"{gate.base}/readyz").status == 200
        reply = post_json(
            f"{gate.base}/v1/chat/completions", {"model": "m", "messages": [user_message(data_url(png(1)))]}
        )
        assert reply.json()["choices"][0]["finish_reason"] == "content_filter"  # threshold 0 from the file
    assert gate.returncode == 0  # stopped by SIGTERM
    assert upstream.received == []


def test_serve_exits_1_when_the_engine_cannot_load(tmp_path):
    engine = tmp_path / "broken"
    engine.mkdir()
    (engine / "manifest.json").write_text("{not json")
    with gate_process("--engine", str(engine), "--upstream", "http://127.0.0.1:9", ready=False) as gate:
        assert gate.process.wait(timeout=60) == 1
        gate.wait_line(r"not valid JSON", timeout=5)


def serve_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "safeclip.runtime.cli", "serve", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            'audit_log = "{tmp}/no-such-folder/audit.jsonl"',
            "audit_log: cannot write {tmp}/no-such-folder/audit.jsonl: "
            "the folder {tmp}/no-such-folder does not exist (create it first)",
        ),
        ('audit_log = "{tmp}"', "audit_log: {tmp} is a folder; give a file path"),
        (
            'engine = "{tmp}/engines/llava15"',
            "engine: {tmp}/engines/llava15: no such folder (build one with `make engine NAME=...`)",
        ),
        ('engine = "{tmp}"', "engine: {tmp}: no manifest.json"),
    ],
)
def test_paths_in_the_config_are_checked_when_it_is_loaded(tiny_engine, tmp_path, setting, message):
    """The README's gate.toml on a machine without /var/log/safeclip: one line and exit 2 before the server
    starts (it used to be a FileNotFoundError traceback and an unclosed client session)."""
    config = tmp_path / "gate.toml"
    lines = {"engine": f'engine = "{tiny_engine}"', "upstream": 'upstream = "http://127.0.0.1:9"'}
    key = setting.split(" = ")[0]
    lines[key] = setting.format(tmp=tmp_path)
    config.write_text("\n".join(lines.values()) + "\n")
    process = serve_process("--config", str(config), "--port", "0")
    assert process.returncode == 2, process.stderr
    [line] = process.stderr.splitlines()  # one line: no traceback, no "Unclosed client session"
    assert line.startswith(f"safeclip serve: {message.format(tmp=tmp_path)}")


def test_an_audit_log_that_can_be_written_is_accepted(tiny_engine, tmp_path):
    from safeclip.runtime.server.config import check_paths

    existing = tmp_path / "audit.jsonl"
    existing.write_text("")
    for audit_log in ("-", str(tmp_path / "new.jsonl"), str(existing)):
        check_paths(load_config(None, {"engine": str(tiny_engine), "audit_log": audit_log}))


def test_port_in_use_is_one_clear_line_and_exit_2(tiny_engine):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = subprocess.run(
            [
                sys.executable,
                "-m",
                "safeclip.runtime.cli",
                "serve",
                "--engine",
                str(tiny_engine),
                "--port",
                str(port),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert process.returncode == 2
    lines = [line for line in process.stderr.splitlines() if "safeclip serve:" in line]
    assert lines == [f"safeclip serve: cannot listen on 127.0.0.1:{port} (Address already in use)"], process.stderr
    assert "Traceback" not in process.stderr
