"""`safeclip export-triton` writes a Triton model repository that Triton's own schema accepts.

No server here: the configs are parsed with tritonclient's ModelConfig protobuf (the schema tritonserver
itself reads config.pbtxt with) and their content is checked field by field. Serving is in
test_triton_backend.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from safeclip.export import triton_repo
from safeclip.export.triton_repo import Batching, TritonRepoError, parse_config, write_model_repository
from safeclip.runtime import contract
from safeclip.runtime.backends.triton import SHA256_PARAMETER
from safeclip.runtime.cli import main as safeclip_main

PLAN_PROFILE_MAX = 8


@pytest.fixture
def engine_with_plan(engine_copy):
    """A fake `safeclip build-engine` result: dummy plan bytes, their real sha256, and a build record."""
    plan = engine_copy / "model.plan"
    plan.write_bytes(b"not a real TensorRT plan; Triton never loads it in these tests")
    manifest = contract.read_manifest(engine_copy).with_artifact(contract.artifact_for(engine_copy, plan, "trt"))
    extra = dict(
        manifest.extra,
        tensorrt={
            "version": "10.9.0",
            "gpu": "NVIDIA H200",
            "compute_capability": "9.0",
            "strongly_typed": True,
            "source": "model.fp16.onnx",
            "profile": {"min": 1, "opt": 4, "max": PLAN_PROFILE_MAX},
        },
    )
    contract.write_manifest(engine_copy, replace(manifest, extra=extra))
    return engine_copy


def load_config(folder):
    return parse_config((folder / triton_repo.CONFIG_FILE).read_text(), str(folder))


def tensors(messages):
    return [(t.name, t.data_type, list(t.dims)) for t in messages]


def test_onnxruntime_model(tiny_engine, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    manifest = contract.read_manifest(tiny_engine)
    folders = write_model_repository(tiny_engine, tmp_path / "repo", batching=Batching(16, (4, 8), 500))
    assert folders == (tmp_path / "repo" / "safeclip",)  # no plan in the engine -> no tensorrt_plan model
    folder = folders[0]
    cfg = load_config(folder)

    assert (cfg.name, cfg.platform, cfg.backend, cfg.max_batch_size) == (
        "safeclip",
        "onnxruntime_onnx",
        "onnxruntime",
        16,
    )
    # No batch dimension in dims: max_batch_size > 0 makes Triton prepend it.
    size = manifest.image.size
    assert tensors(cfg.input) == [("image", pb.TYPE_UINT8, [size, size, 3])]
    assert tensors(cfg.output) == [("probs", pb.TYPE_FP32, [len(manifest.categories)]), ("embeds", pb.TYPE_FP32, [32])]
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500

    [accelerator] = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    params = dict(accelerator.parameters)
    assert params["precision_mode"] == "FP16"
    assert params["trt_layer_norm_fp32_fallback"] == "1"
    assert params["trt_profile_max_shapes"] == f"image:16x{size}x{size}x3"
    assert params["trt_profile_opt_shapes"] == f"image:8x{size}x{size}x3"
    # The TensorRT EP creates only the last folder of its cache path: one new level inside /tmp.
    assert params["trt_engine_cache_path"] == params["trt_timing_cache_path"] == "/tmp/safeclip-trt-cache"

    fp32 = manifest.artifact("fp32")
    assert cfg.parameters[SHA256_PARAMETER].string_value == fp32.sha256
    assert contract.sha256_file(folder / "1" / "model.onnx") == fp32.sha256
    assert json.loads((folder / "manifest.json").read_text()) == json.loads((tiny_engine / "manifest.json").read_text())


def test_tensorrt_plan_model_where_a_plan_exists(engine_with_plan, tmp_path):
    from tritonclient.grpc import model_config_pb2 as pb

    manifest = contract.read_manifest(engine_with_plan)
    folders = write_model_repository(
        engine_with_plan, tmp_path / "repo", name="gate", batching=Batching(16, (4, 8, 16))
    )
    assert [f.name for f in folders] == ["gate", "gate_trt"]
    cfg = load_config(folders[1])
    assert (cfg.name, cfg.platform, cfg.backend) == ("gate_trt", "tensorrt_plan", "tensorrt")
    # Capped at the plan's profile maximum, which Triton would otherwise refuse to load.
    assert cfg.max_batch_size == PLAN_PROFILE_MAX
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert tensors(cfg.input) == [("image", pb.TYPE_UINT8, [manifest.image.size, manifest.image.size, 3])]
    assert [t.name for t in cfg.output] == list(manifest.outputs)
    assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert cfg.parameters[SHA256_PARAMETER].string_value == manifest.artifact("trt").sha256
    assert (folders[1] / "1" / "model.plan").read_bytes() == (engine_with_plan / "model.plan").read_bytes()
    assert "TensorRT 10.9.0" in (folders[1] / "config.pbtxt").read_text()  # tells operators which Triton fits


def test_plan_without_build_record_is_refused(engine_with_plan, tmp_path):
    manifest = contract.read_manifest(engine_with_plan)
    contract.write_manifest(engine_with_plan, replace(manifest, extra={}))
    with pytest.raises(contract.ManifestError, match="without a build record"):
        write_model_repository(engine_with_plan, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()  # validated before anything is written


def test_tampered_onnx_is_refused(engine_copy, tmp_path):
    with open(engine_copy / "model.fp32.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(contract.ManifestError, match="does not match"):
        write_model_repository(engine_copy, tmp_path / "repo")


def test_manifest_that_disagrees_with_the_onnx_is_refused(engine_copy, tmp_path):
    manifest = contract.read_manifest(engine_copy)
    contract.write_manifest(engine_copy, replace(manifest, image=replace(manifest.image, size=64)))
    with pytest.raises(contract.ManifestError, match="differ from the manifest"):
        write_model_repository(engine_copy, tmp_path / "repo")


def test_schema_validation_can_fail():
    """Guards the tests above against passing vacuously: the parser does reject what Triton would."""
    with pytest.raises(TritonRepoError, match="not a valid Triton model config"):
        parse_config('name: "x"\nmax_batch_size: 4\ndynamic_batching { preferred_batch: [ 4 ] }\n', "bad")
    with pytest.raises(TritonRepoError, match="not a valid Triton model config"):
        parse_config('name: "x"\ninput [ { name: "image" data_type: TYPE_UINT7 dims: [ 3 ] } ]\n', "bad")


def test_signature_without_onnx_installed(tiny_engine, monkeypatch):
    """The fallback reads the same signature from onnxruntime's session."""
    path = tiny_engine / "model.fp32.onnx"
    expected = triton_repo.onnx_signature(path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    assert triton_repo.onnx_signature(path) == expected


@pytest.mark.parametrize(
    "batching, match",
    [
        ((0, (), 0), "max batch must be >= 1"),
        ((8, (4, 16), 0), r"preferred batch sizes \[16\] are outside 1..8"),
        ((8, (4,), -1), "max queue delay must be >= 0"),
    ],
)
def test_bad_batching_is_refused(batching, match):
    with pytest.raises(TritonRepoError, match=match):
        Batching(*batching)


def test_cli_exit_codes(tiny_engine, tmp_path, capsys):
    out = tmp_path / "repo"
    args = ["export-triton", "--engine", str(tiny_engine), "--out", str(out)]
    assert safeclip_main(args + ["--max-batch", "8", "--preferred-batch", "2,4"]) == 0
    assert f"wrote {out / 'safeclip' / 'config.pbtxt'}" in capsys.readouterr().out
    assert load_config(out / "safeclip").max_batch_size == 8

    assert safeclip_main(args) == 2  # would replace a model folder
    assert "exists; pass --force" in capsys.readouterr().err
    assert safeclip_main(args + ["--force"]) == 0
    assert load_config(out / "safeclip").max_batch_size == 16

    assert safeclip_main(args + ["--force", "--max-batch", "4"]) == 2  # default preferred 8 > 4
    assert "outside 1..4" in capsys.readouterr().err
    assert safeclip_main(args + ["--name", "a/b"]) == 2
    assert safeclip_main(["export-triton", "--engine", str(tmp_path), "--out", str(out)]) == 2
    assert "no manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse refuses a malformed list
        safeclip_main(args + ["--preferred-batch", "4,x"])
    assert e.value.code == 2


def _run_blocked(blocked: tuple[str, ...], body: str) -> subprocess.CompletedProcess:
    script = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_without_tritonclient_the_command_says_so(tiny_engine, tmp_path):
    proc = _run_blocked(
        ("tritonclient",),
        f"""
        from safeclip.runtime.cli import main
        sys.exit(main(["export-triton", "--engine", {str(tiny_engine)!r}, "--out", {str(tmp_path / "repo")!r}]))
    """,
    )
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'safeclip[triton]'" in proc.stderr
    assert not (tmp_path / "repo").exists()


def test_export_triton_is_torch_free(tiny_engine, tmp_path):
    proc = _run_blocked(
        ("torch", "transformers"),
        f"""
        from safeclip.export.triton_repo import write_model_repository
        write_model_repository({str(tiny_engine)!r}, {str(tmp_path / "repo")!r})
    """,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "repo" / "safeclip" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize(
    "given, expected",
    [
        ("/tmp", "/tmp/gate-trt-cache"),
        ("/models/cache/", "/models/cache/gate-trt-cache"),
        ("/", "/gate-trt-cache"),
    ],
)
def test_trt_cache_path_is_one_level_below_an_existing_folder(engine_copy, tmp_path, given, expected):
    folders = write_model_repository(engine_copy, tmp_path / "repo", name="gate", trt_cache_dir=given)
    [accelerator] = load_config(folders[0]).optimization.execution_accelerators.gpu_execution_accelerator
    path = dict(accelerator.parameters)["trt_engine_cache_path"]
    assert path == expected
    # Exactly one folder for the EP to create: its parent is the folder the operator said exists.
    assert path.rsplit("/", 1)[0] in (given.rstrip("/"), "")


def test_relative_trt_cache_dir_is_refused(engine_copy, tmp_path):
    with pytest.raises(TritonRepoError, match="absolute path on the Triton server"):
        write_model_repository(engine_copy, tmp_path / "repo", trt_cache_dir="cache")
