"""`safeclip export`'s input errors: one line, exit 2, and, for what can be checked without torch, before
torch is imported; an existing engine is replaced only with --force, its calibration kept while it applies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from safeclip.runtime import contract

# Runs `safeclip export` in a fresh process where importing torch or transformers fails and every name
# lookup or connection raises: an error the preflight misses surfaces as a traceback (exit 1), not as the
# one-line refusal (exit 2) the tests expect. It prints which of the heavy modules got imported.
GUARDED = """
import json, socket, sys
sys.modules["torch"] = None
sys.modules["transformers"] = None
def no_network(*args, **kwargs):
    raise AssertionError(f"network use: {args!r}")
socket.getaddrinfo = socket.create_connection = no_network
from safeclip.runtime.cli import main
status = main(sys.argv[1:])
print(json.dumps(sorted(m for m in ("torch", "transformers", "onnx") if sys.modules.get(m) is not None)))
sys.exit(status)
"""


def guarded_export(*args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", GUARDED, "export", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def refused(proc: subprocess.CompletedProcess) -> str:
    """The error line of a refusal that imported neither torch nor transformers."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == []
    [line] = proc.stderr.strip().splitlines()[:1]
    assert line.startswith("safeclip export: error: ")
    return proc.stderr


def test_a_missing_local_folder_is_no_such_folder_without_a_hub_lookup(tmp_path):
    err = refused(guarded_export("--model", "/models/clip-vit-large-patch14-336", "--out", tmp_path / "e"))
    assert "'/models/clip-vit-large-patch14-336': no such folder" in err
    err = refused(guarded_export("--model", "./checkpoints/clip", "--out", tmp_path / "e"))
    assert "no such folder" in err
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "is a file, not a checkpoint folder" in refused(
        guarded_export("--model", tmp_path / "weights.bin", "--out", tmp_path / "e")
    )
    (tmp_path / "empty-ckpt").mkdir()
    assert "has no config.json" in refused(guarded_export("--model", tmp_path / "empty-ckpt", "--out", tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_offline_and_not_cached_stops_before_torch(tmp_path):
    """What `HF_HUB_OFFLINE=1 make engine NAME=llava15` runs: the hub cache and the offline switch are read
    first, so it stops without importing torch (measured by the import, not by a clock)."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    err = refused(guarded_export("--model", "openai/clip-vit-large-patch14-336", "--out", tmp_path / "e", env=env))
    assert "HF_HUB_OFFLINE is set and it is not in the local cache" in err
    assert "tiny-random" in err and "local" in err


def test_offline_with_the_checkpoint_cached_goes_on_to_the_export(tmp_path):
    """The cache check says yes for a cached checkpoint: the guarded process goes on to the export, which
    then needs torch (blocked here) and says which extra brings it."""
    snapshot = tmp_path / "hf" / "hub" / "models--someone--clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = guarded_export("--model", "someone/clip", "--out", tmp_path / "e", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "missing dependency (torch); install it with `pip install 'safeclip[export]'`" in proc.stderr


def test_a_broken_descriptor_file_is_reported_before_torch(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[category]]\nname = "gun"\nphrases = "not a list"\n')
    err = refused(guarded_export("--model", "tiny-random", "--descriptors", bad, "--out", tmp_path / "e"))
    assert str(bad) in err
    bad.write_text("this is = = not toml")
    assert str(bad) in refused(guarded_export("--model", "tiny-random", "--descriptors", bad, "--out", tmp_path / "e"))
    assert not (tmp_path / "e").exists()


def test_an_existing_engine_is_not_overwritten_without_force(engine_copy):
    before = (engine_copy / contract.MANIFEST_FILE).read_bytes()
    err = refused(guarded_export("--model", "tiny-random", "--out", engine_copy))
    assert "already exists and is not empty; pass --force" in err
    assert (engine_copy / contract.MANIFEST_FILE).read_bytes() == before


def calibrated(engine_dir: Path) -> contract.Manifest:
    """Marks the engine as `safeclip calibrate` leaves it: new thresholds and a calibration record."""
    manifest = contract.read_manifest(engine_dir)
    thresholds = {name: 0.1234 for name in manifest.thresholds}
    record = {"target_fpr": 0.03, "report": str(engine_dir / "calibration")}
    updated = replace(manifest, thresholds=thresholds, extra={**manifest.extra, "calibration": record})
    contract.write_manifest(engine_dir, updated)
    return updated


@pytest.mark.slow
def test_force_replaces_the_engine_and_keeps_its_calibration(engine_copy, capsys):
    from safeclip.export.cli import main

    old = calibrated(engine_copy)
    assert main(["--model", "tiny-random", "--out", str(engine_copy), "--force", "--precision", "fp32"]) == 0
    assert "kept the calibrated thresholds" in capsys.readouterr().out
    new = contract.read_manifest(engine_copy)
    assert [a.precision for a in new.artifacts] == ["fp32"]  # it was re-exported
    assert new.thresholds == old.thresholds and new.extra["calibration"] == old.extra["calibration"]

    assert main(["--model", "tiny-random", "--out", str(engine_copy), "--force", "--reset-calibration"]) == 0
    assert "calibration reset" in capsys.readouterr().out
    reset = contract.read_manifest(engine_copy)
    assert set(reset.thresholds.values()) == {contract.DEFAULT_THRESHOLD} and "calibration" not in reset.extra


def test_calibration_is_dropped_when_the_probabilities_change(tiny_engine):
    from safeclip.export.cli import carry_calibration

    base = contract.read_manifest(tiny_engine)
    old = replace(base, thresholds={n: 0.2 for n in base.thresholds}, extra={"calibration": {"x": 1}})
    same, note = carry_calibration(old, base)
    assert same.thresholds == old.thresholds and note == "kept the calibrated thresholds"
    for change in ({"cls": "penultimate"}, {"model_hash": "sha256:other"}, {"logit_scale": 50.0}):
        new, note = carry_calibration(old, replace(base, **change))
        assert new.thresholds == base.thresholds and "calibration" not in new.extra
        assert f"the new engine's {next(iter(change))} differ" in note
