"""Photo-like test images made on the fly (nothing binary is committed)."""

from __future__ import annotations

import cv2
import numpy as np


def smooth_images(count: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB: blurred colour noise plus a few solid shapes."""
    width = width or height
    rng = np.random.default_rng(seed)
    out = np.empty((count, height, width, 3), np.uint8)
    for i in range(count):
        coarse = rng.uniform(0, 255, (max(2, height // 16), max(2, width // 16), 3)).astype(np.float32)
        img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            radius = int(rng.integers(1, max(2, min(height, width) // 3)))
            cv2.circle(img, center, radius, rng.uniform(0, 255, 3).tolist(), -1)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def encode(image_rgb: np.ndarray, ext: str = ".png", params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params or [])
    if not ok:
        raise RuntimeError(f"could not encode test image as {ext}")
    return buf.tobytes()
