"""Every TensorRT and cuda-python attribute the code uses exists, for each supported major, on CPU.

The attributes are read from the source (AST), not listed by hand, so new code is checked as it is
written. The bindings come from `make install`, which unpacks one wheel per supported major into
.venv/gpu-bindings/ (they cannot share one venv). TensorRT's bindings link libnvinfer & co., which only
the multi-GB libs wheel carries: a few stub libraries with the same sonames and entry points (built
here with cc) let the real binding module load, enough for introspection; nothing is executed. A
tensorrt/cuda installed in this venv (a GPU machine) is checked too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BINDINGS = Path(sys.prefix) / "gpu-bindings"
TRT_SOURCES = ("runtime/safeclip/runtime/backends/tensorrt.py", "export/safeclip/export/tensorrt_build.py")
CUDA_SOURCES = ("runtime/safeclip/runtime/cuda.py", "runtime/safeclip/runtime/backends/tensorrt.py")
# Objects the code calls methods on -> the TensorRT class they are.
TRT_RECEIVERS = {
    "_engine": "ICudaEngine",
    "_context": "IExecutionContext",
    "_runtime": "Runtime",
    "builder": "Builder",
    "config": "IBuilderConfig",
    "network": "INetworkDefinition",
    "onnx_parser": "OnnxParser",
    "opt_profile": "IOptimizationProfile",
    "layer": "ILayer",
    "timings": "ITimingCache",
}
CUDA_RECEIVERS = {"props": "cudaDeviceProp"}
# Attributes used only on a path that the majors without them never take.
TRT_GUARDED = {
    # _weakly_typed_fp16 runs only where NetworkDefinitionCreationFlag.STRONGLY_TYPED is missing (< 9).
    "BuilderFlag.FP16",
    "BuilderFlag.OBEY_PRECISION_CONSTRAINTS",
    "ILayer.precision",
    "ILayer.set_output_type",
}
# Symbols TensorRT's binding module imports from libnvinfer, libnvinfer_plugin and libnvonnxparser.
TRT_ENTRY_POINTS = (
    "createInferBuilder_INTERNAL",
    "createInferRefitter_INTERNAL",
    "createInferRuntime_INTERNAL",
    "createNvOnnxParserRefitter_INTERNAL",
    "createNvOnnxParser_INTERNAL",
    "getBuilderPluginRegistry",
    "getNvOnnxParserVersion",
    "getPluginRegistry",
    "initLibNvInferPlugins",
)


def _chain(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        parts.append(node.func.id + "()")
    else:
        return None
    return parts[::-1]


def used_attributes(sources: tuple[str, ...], roots: set[str], receivers: dict[str, str]) -> set[str]:
    """'Class.attr' or 'module.attr.attr' paths the sources use on the given module names and receivers."""
    found = set()
    for source in sources:
        tree = ast.parse((ROOT / source).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain = _chain(node)
            if not chain:
                continue
            if chain[0] in roots and len(chain) > 1:
                # trt.__version__.split: the module's attribute, then a str method.
                found.add("__version__" if chain[1] == "__version__" else ".".join(chain[1:]))
            elif chain[0] == "self" and len(chain) > 2 and chain[1] in receivers:
                found.add(f"{receivers[chain[1]]}.{chain[2]}")
            elif chain[0] in receivers and len(chain) > 1:
                found.add(f"{receivers[chain[0]]}.{chain[1]}")
    # Only the longest chains: trt.Logger.WARNING also walks past trt.Logger.
    return {a for a in found if not any(b.startswith(a + ".") for b in found)}


TRT_USED = used_attributes(TRT_SOURCES, {"trt"}, TRT_RECEIVERS)
CUDA_USED = used_attributes(CUDA_SOURCES, {"rt", "cudart()"}, CUDA_RECEIVERS)

PROBE = textwrap.dedent("""
    import importlib, json, sys
    module = importlib.import_module(sys.argv[1])
    missing = []
    for path in json.loads(sys.argv[2]):
        obj = module
        for part in path.split("."):
            if not hasattr(obj, part):
                missing.append(path)
                break
            obj = getattr(obj, part)
            if callable(obj) and part.startswith("cudaDeviceProp"):
                obj = obj()
    print(json.dumps({"version": getattr(module, "__version__", "?"), "missing": missing}))
""")


def probe(module: str, paths: set[str], pythonpath: Path | None, env_extra: dict | None = None) -> dict:
    import os

    env = dict(os.environ, **(env_extra or {}))
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, module, json.dumps(sorted(paths))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, f"importing {module} from {pythonpath}: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)


def trt_stubs(tmp: Path, major: str) -> Path:
    """libnvinfer.so.MAJOR & co. exporting the binding's entry points, so `import tensorrt_bindings` loads."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stub TensorRT libraries the bindings link against")
    source = tmp / "stub.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in TRT_ENTRY_POINTS))
    out = tmp / f"stubs{major}"
    out.mkdir()
    for lib in ("libnvinfer", "libnvinfer_plugin", "libnvonnxparser"):
        soname = f"{lib}.so.{major}"
        subprocess.run(
            [cc, "-shared", "-fPIC", "-o", str(out / soname), f"-Wl,-soname,{soname}", str(source)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return out


def binding_sets(prefix: str) -> list[Path]:
    return sorted(BINDINGS.glob(f"{prefix}*")) if BINDINGS.is_dir() else []


def test_the_scan_finds_what_the_code_uses():
    """The AST scan itself: calls known to be in the code are found (else the checks below prove nothing)."""
    assert {
        "ICudaEngine.get_tensor_name",
        "IExecutionContext.execute_async_v3",
        "IBuilderConfig.set_timing_cache",
        "Logger.WARNING",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
        "nptype",
    } <= TRT_USED
    assert {
        "cudaMallocHost",
        "cudaMemcpyKind.cudaMemcpyHostToDevice",
        "cudaStreamCreate",
        "cudaStreamDestroy",
        "cudaDeviceProp.name",
        "cudaGetErrorString",
    } <= CUDA_USED


@pytest.mark.parametrize("folder", binding_sets("tensorrt") or [None], ids=lambda p: p.name if p else "none")
def test_tensorrt_attributes_exist(folder, tmp_path):
    if folder is None:
        pytest.skip(f"no TensorRT bindings under {BINDINGS} (`make install` unpacks them)")
    major = next(p.name for p in folder.glob("tensorrt_*_bindings-*.dist-info")).split("-")[1].split(".")[0]
    stubs = trt_stubs(tmp_path, major)
    result = probe("tensorrt_bindings", TRT_USED, folder, {"LD_LIBRARY_PATH": str(stubs)})
    missing = sorted(set(result["missing"]) - TRT_GUARDED)
    assert not missing, f"TensorRT {result['version']} lacks {missing}"


@pytest.mark.parametrize("folder", binding_sets("cuda") or [None], ids=lambda p: p.name if p else "none")
def test_cuda_python_attributes_exist(folder):
    if folder is None:
        pytest.skip(f"no cuda-python bindings under {BINDINGS} (`make install` unpacks them)")
    result = probe("cuda.bindings.runtime", CUDA_USED, folder)
    assert not result["missing"], f"cuda-python {folder.name} lacks {result['missing']}"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="tensorrt is not installed in this venv")
def test_installed_tensorrt_has_the_attributes():
    result = probe("tensorrt", TRT_USED, None)
    assert not sorted(set(result["missing"]) - TRT_GUARDED), result


def test_cuda_errors_are_backend_errors_with_the_runtime_s_words():
    """Without a GPU the real cuda-python reports a driver error; current_device() turns it into a CudaError
    (a BackendError, which `safeclip screen` reports in one line) naming the call and the error."""
    folders = binding_sets("cuda13")
    if not folders:
        pytest.skip(f"no cuda-python bindings under {BINDINGS} (`make install` unpacks them)")
    code = textwrap.dedent("""
        from safeclip.runtime.backends.base import BackendError
        from safeclip.runtime.cuda import current_device
        try:
            current_device()
        except BackendError as e:
            print(type(e).__name__, e)
        else:
            print("a GPU is here")
    """)
    import os

    env = dict(os.environ, PYTHONPATH=str(folders[0]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if proc.stdout.startswith("a GPU is here"):
        pytest.skip("this machine has a working GPU")
    assert proc.stdout.startswith("CudaError cudaGetDevice failed: cudaError"), proc.stdout
