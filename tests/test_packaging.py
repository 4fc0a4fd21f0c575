"""The built wheel and sdist hold every module and data file of the source tree that the package is made of.

An editable install (what the other tests run on) imports straight from the folders, so a module the
packaging leaves out only shows when someone installs the wheel: this test builds both distributions the
way `pip install .` and a release would (`python -m build`: the sdist, then the wheel from the sdist) and
compares their contents with a walk of the source folders.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The stage folders, each a src layout: everything under <stage>/safeclip/ lands under safeclip/ in the wheel.
# Only the folders are named here; their files are found by walking the tree, so a new module or data file
# is expected without editing this test.
STAGES = ("runtime", "export", "calibration")
# What a source folder holds that is not part of the package.
NOT_SHIPPED_DIRS = {"__pycache__"}
NOT_SHIPPED_SUFFIXES = {".pyc", ".pyo"}


def tracked_files() -> list[str]:
    """The repository's files as git knows them (tracked, or new and not ignored): build output and
    caches under the source folders are not part of the tree."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *STAGES],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in out.splitlines() if (REPO / line).is_file()]


def expected_wheel_files() -> set[str]:
    expected = set()
    for name in tracked_files():
        path = Path(name)
        if NOT_SHIPPED_DIRS & set(path.parts) or path.suffix in NOT_SHIPPED_SUFFIXES:
            continue
        stage, package, *rest = path.parts
        assert stage in STAGES and package == "safeclip", f"{name}: a file outside the package folder"
        expected.add("/".join([package, *rest]))
    return expected


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    # From a folder outside the repository: run inside it, `python -m build` would import the
    # repository's gitignored build/ output folder as the `build` package.
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [wheel] = out.glob("*.whl")
    [sdist] = out.glob("*.tar.gz")
    return wheel, sdist


@pytest.mark.slow
def test_the_source_walk_finds_the_modules_the_gate_needs():
    """The expected list is not empty or partial: the dialect modules and the data files are in it."""
    expected = expected_wheel_files()
    assert "safeclip/runtime/server/dialects/openai_chat.py" in expected
    assert "safeclip/export/descriptor_files/default.toml" in expected
    assert "safeclip/py.typed" in expected
    assert len([f for f in expected if f.endswith(".py")]) > 60


@pytest.mark.slow
def test_wheel_holds_every_module_and_data_file(distributions):
    wheel, _ = distributions
    with zipfile.ZipFile(wheel) as zf:
        shipped = set(zf.namelist())
    missing = sorted(expected_wheel_files() - shipped)
    assert not missing, f"{wheel.name} lacks {missing}"
    # The console script is declared, and nothing outside the package (tests, bench) is shipped as code.
    [entry_points] = [n for n in shipped if n.endswith(".dist-info/entry_points.txt")]
    with zipfile.ZipFile(wheel) as zf:
        assert "safeclip = safeclip.runtime.cli:main" in zf.read(entry_points).decode()
    stray = sorted(n for n in shipped if not n.startswith(("safeclip/", "safeclip-")))
    assert not stray, stray


@pytest.mark.slow
def test_sdist_holds_every_source_file(distributions):
    """The sdist is what the wheel above was built from, and what a distribution rebuilds from."""
    _, sdist = distributions
    with tarfile.open(sdist) as tf:
        names = {"/".join(Path(n).parts[1:]) for n in tf.getnames()}
    wanted = {
        f
        for f in tracked_files()
        if not (NOT_SHIPPED_DIRS & set(Path(f).parts) or Path(f).suffix in NOT_SHIPPED_SUFFIXES)
    }
    missing = sorted(wanted - names)
    assert not missing, f"{sdist.name} lacks {missing}"
    assert {"pyproject.toml", "README.md"} <= names
