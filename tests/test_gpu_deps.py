"""`pip install 'safeclip[gpu]'` resolves to one onnxruntime build and the TensorRT major it links.

Needs the package registry (CI has it); skipped with the reason when it cannot be reached. pip resolves
the extra with --dry-run --report, so nothing is installed.

TensorRT's libs package on the registry is a placeholder that downloads the real wheel from NVIDIA's own
index while pip reads its metadata; that index is not reachable here. The test learns which version the
resolver picks, then offers pip a metadata-only stand-in wheel of that exact version (pip prefers a wheel
to a source package of the same version), so the rest of the set resolves as it would for a user.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORT_DISTS = {"onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training"}
# What onnxruntime-gpu's TensorRT provider (libonnxruntime_providers_tensorrt.so) links, by release, read
# from the wheel's ELF NEEDED entries; test_linked_majors_match_the_wheel re-reads them from the registry.
ORT_GPU_LINKS = {"1.31": {"tensorrt": 10, "cuda": 13}}
TRT_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_tensorrt.so"
UNREACHABLE = re.compile(
    r"Could not fetch|NewConnectionError|Network is unreachable|Temporary failure in name "
    r"resolution|Max retries exceeded|ConnectTimeout|ReadTimeout"
)


def gpu_requirements() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]


def dry_run(tmp: Path, name: str, *args: str) -> list[dict]:
    report = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        str(report),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        if UNREACHABLE.search(proc.stderr):
            pytest.skip(f"the package registry is unreachable: {UNREACHABLE.search(proc.stderr).group(0)}")
        pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return [
        {"name": i["metadata"]["name"].lower().replace("_", "-"), "version": i["metadata"]["version"]}
        for i in json.loads(report.read_text())["install"]
    ]


def stand_in_wheel(folder: Path, name: str, version: str) -> None:
    """A wheel with metadata only: what pip's resolver reads, without the placeholder's download."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: safeclip-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
        whl.writestr(f"{dist}.dist-info/RECORD", "".join(f"{p},,\n" for p in files) + f"{dist}.dist-info/RECORD,,\n")


def major(version: str) -> int:
    return int(version.split(".")[0])


@pytest.fixture(scope="module")
def resolved(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("resolve")
    trt_req = next(r for r in gpu_requirements() if r.startswith("tensorrt-cu"))
    trt_dist = re.match(r"[A-Za-z0-9_.-]+", trt_req).group(0)
    [picked] = dry_run(tmp, "tensorrt", "--no-deps", trt_req)
    stands_in = tmp / "stand-ins"
    stands_in.mkdir()
    stand_in_wheel(stands_in, f"{trt_dist}-libs", picked["version"])
    return dry_run(tmp, "gpu", "--find-links", str(stands_in), f"{ROOT}[gpu]")


@pytest.mark.slow
def test_gpu_extra_installs_exactly_one_onnxruntime_build(resolved):
    builds = [p for p in resolved if p["name"] in ORT_DISTS]
    assert [b["name"] for b in builds] == ["onnxruntime-gpu"], builds


@pytest.mark.slow
def test_gpu_extra_tensorrt_major_is_the_one_onnxruntime_gpu_links(resolved):
    versions = {p["name"]: p["version"] for p in resolved}
    ort = versions["onnxruntime-gpu"]
    links = ORT_GPU_LINKS.get(".".join(ort.split(".")[:2]))
    assert links, f"onnxruntime-gpu {ort} is not in ORT_GPU_LINKS: read its TensorRT provider's NEEDED entries first"
    trt = {name: v for name, v in versions.items() if name.startswith("tensorrt")}
    assert trt and {major(v) for v in trt.values()} == {links["tensorrt"]}, trt
    # Every TensorRT and CUDA package is for the CUDA major onnxruntime-gpu was built with.
    assert all(f"-cu{links['cuda']}" in name for name in trt if name != "tensorrt"), trt
    assert major(versions["cuda-python"]) == links["cuda"] == major(versions["nvidia-cuda-runtime"])


@pytest.mark.slow
def test_linked_majors_match_the_wheel(resolved, tmp_path):
    """ORT_GPU_LINKS against the real wheel: the TensorRT provider's DT_NEEDED sonames."""
    ort = next(p["version"] for p in resolved if p["name"] == "onnxruntime-gpu")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "-d",
        str(tmp_path),
        f"onnxruntime-gpu=={ort}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and UNREACHABLE.search(proc.stderr):
        pytest.skip("the package registry is unreachable")
    assert proc.returncode == 0, proc.stderr[-2000:]
    [wheel] = tmp_path.glob("onnxruntime_gpu-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        provider = whl.read(TRT_PROVIDER)
    needed = set(re.findall(rb"(lib(?:nvinfer|cudart)\.so\.(\d+))\x00", provider))
    linked = {name.decode().split(".so")[0]: int(v) for name, v in needed}
    expected = ORT_GPU_LINKS[".".join(ort.split(".")[:2])]
    assert linked == {"libnvinfer": expected["tensorrt"], "libcudart": expected["cuda"]}, linked
