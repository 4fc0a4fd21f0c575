"""`from safeclip import Gate, Verdict, ImageError`: the public API at the package root, without torch or aiohttp."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import safeclip


def test_the_public_names_are_the_runtimes_own():
    from safeclip.runtime.decision import Verdict
    from safeclip.runtime.gate import Gate
    from safeclip.runtime.preprocess import ImageError

    assert (safeclip.Gate, safeclip.Verdict, safeclip.ImageError) == (Gate, Verdict, ImageError)
    assert set(safeclip.__all__) == set(safeclip._EXPORTS) | {"__version__"}
    for name in safeclip.__all__:
        assert getattr(safeclip, name) is not None, name
    assert set(safeclip.__all__) <= set(dir(safeclip))


def test_an_unknown_name_says_what_there_is():
    with pytest.raises(AttributeError, match=r"no attribute 'Gates'.*'Gate'"):
        safeclip.Gates  # noqa: B018


def test_imports_and_screens_with_torch_and_aiohttp_blocked(tiny_engine):
    script = textwrap.dedent(f"""
        import sys
        for blocked in ("torch", "transformers", "aiohttp", "cv2"):
            sys.modules[blocked] = None  # any import of them raises ImportError
        import safeclip
        assert "numpy" not in sys.modules, "import safeclip alone should import nothing heavy"
        from safeclip import Gate, ImageError, Verdict
        import numpy as np
        gate = Gate.from_engine({str(tiny_engine)!r}, backend="cpu")
        [verdict] = gate.check([np.zeros((80, 60, 3), np.uint8)])
        assert isinstance(verdict, Verdict)
        [error] = gate.screen([b"not an image"])
        assert isinstance(error, ImageError)
        print("ok", safeclip.__version__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ")
