"""The runtime must import and screen with torch, transformers, OpenCV, Ray and pyarrow unavailable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_imports_and_screens_without_torch(tiny_engine):
    script = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        for blocked in ("torch", "transformers", "cv2", "ray", "pyarrow"):
            sys.modules[blocked] = None  # any import of them raises ImportError
        import safeclip.runtime as runtime
        names = [m.name for m in pkgutil.walk_packages(runtime.__path__, "safeclip.runtime.")]
        for name in names:
            importlib.import_module(name)
        from safeclip.runtime.gate import Gate
        import numpy as np
        verdicts = Gate.from_engine({str(tiny_engine)!r}, backend="cpu").check([np.zeros((80, 60, 3), np.uint8)])
        assert len(verdicts) == 1
        import safeclip.calibration.shard_scan  # the local shard scan needs Ray only for --ray
        print(len(names), "modules")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = int(proc.stdout.split()[0])
    assert imported >= 8  # contract, decision, engine, gate, preprocess, screen, cli, backends...


def test_the_check_itself_can_fail():
    """Guard against the test above passing vacuously: blocking torch does break a torch import."""
    script = "import sys; sys.modules['torch'] = None; import safeclip.export.graph"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "torch" in proc.stderr
