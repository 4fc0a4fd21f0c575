"""What `export` checks before it imports torch: the checkpoint's whereabouts, the descriptor file and
the output folder. Importing torch and transformers takes ~10 s; a typo should cost a fraction of a second.

This module imports neither (tests/test_export_errors.py runs each check with torch blocked), so
`safeclip export` runs these first and `models.load_clip` runs the same checkpoint check again for callers
of the Python API.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from safeclip.runtime import contract

DEFAULT_MODEL = "openai/clip-vit-large-patch14-336"
TINY_RANDOM = "tiny-random"
# How long the hub gets to accept a TCP connection before the download is not even tried: without the probe,
# an offline machine spends tens of seconds in the hub client's retries before failing.
HUB_PROBE_SECONDS = 3.0


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded, with what to do about it."""


class OutputExists(ValueError):
    """The output folder already holds an engine and --force was not given."""


def looks_like_path(model: str) -> bool:
    """True for what can only be a folder: a hub id is `name` or `owner/name`, never absolute, never
    starting with `.` or `~`, never with a backslash or two slashes."""
    return (
        os.path.isabs(model)
        or model.startswith((".", "~"))
        or "\\" in model
        or model.count("/") > 1
        or Path(model).exists()
    )


def hub_offline() -> bool:
    switches = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in {"1", "true", "yes", "on"} for v in switches)


def in_hub_cache(model: str) -> bool:
    """Whether the hub client's cache holds the checkpoint's config (read without transformers)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except ValueError:  # not a valid repository id: it can be neither cached nor downloaded
        return False


def hub_unreachable(timeout: float = HUB_PROBE_SECONDS) -> str | None:
    """Why the hub (HF_ENDPOINT, or the HTTPS proxy when one is set) cannot be reached, or None when a TCP
    connection to it opens within `timeout` seconds. Name resolution counts against the timeout too."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    errors: list[OSError] = []
    done = threading.Event()

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            errors.append(e)
        done.set()

    # A thread, because getaddrinfo has no timeout of its own and a dead resolver can hang for long.
    threading.Thread(target=connect, daemon=True).start()
    if not done.wait(timeout):
        return f"{host}:{port} did not answer within {timeout:g} s"
    return f"{host}:{port}: {errors[0].strerror or errors[0]}" if errors else None


def offline_message(model: str, why: str) -> str:
    return (
        f"cannot load CLIP checkpoint {model!r}: {why}.\n"
        "Fixes: pass --model /path/to/a/local/hf-checkpoint (a folder with config.json and the weights), "
        f"download it once where the hub is reachable (it is cached for later), "
        f"or use --model {TINY_RANDOM} for a smoke test."
    )


def check_model(model: str, probe_hub: bool = True) -> None:
    """ModelLoadError unless `model` is tiny-random, an existing folder, or a hub id that is cached or can
    be downloaded (HF_HUB_OFFLINE unset and, with `probe_hub`, the hub answering)."""
    if model == TINY_RANDOM:
        return
    if looks_like_path(model):
        path = Path(model).expanduser()
        if not path.is_dir():
            what = "is a file, not a checkpoint folder" if path.exists() else "no such folder"
            raise ModelLoadError(
                f"cannot load CLIP checkpoint {model!r}: {what} (a local checkpoint is a folder with "
                "config.json and the weights; a hub id is owner/name)"
            )
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load CLIP checkpoint {model!r}: the folder has no config.json")
        return
    if in_hub_cache(model):
        return
    if hub_offline():
        raise ModelLoadError(offline_message(model, "HF_HUB_OFFLINE is set and it is not in the local cache"))
    if probe_hub:
        unreachable = hub_unreachable()
        if unreachable:
            why = f"it is not in the local cache and the hub is unreachable ({unreachable})"
            raise ModelLoadError(offline_message(model, why))


def check_output(out: str | Path, force: bool) -> contract.Manifest | None:
    """The manifest of the engine `out` already holds (to carry its calibration over), or None for a new
    folder. OutputExists when it holds anything and `force` is not given."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out}: is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not force:
        raise OutputExists(
            f"--out {out} already exists and is not empty; pass --force to replace the engine in it "
            "(its calibrated thresholds are kept unless --reset-calibration is given too)"
        )
    if not (out / contract.MANIFEST_FILE).is_file():
        return None
    try:
        return contract.read_manifest(out)
    except contract.ManifestError:  # replaced anyway (--force): a broken manifest has nothing to carry over
        return None
