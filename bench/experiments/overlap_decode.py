"""Experiment: does decoding the next chunk while the engine runs the current one help Gate.screen on 2 cores?"""

import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.fixtures import arch, build_engine, jpegs, random_clip
from safeclip.runtime.gate import Gate

out = Path("/tmp/overlap-engine")
if not (out / "manifest.json").exists():
    a = arch("vit-b-32")
    build_engine(a, random_clip(a), out, fp16=False, tower=False)
gate = Gate.from_engine(out, backend="cpu", precision="fp32", max_batch=8)
images = jpegs(32, 768, 1024, seed=7)
CHUNK = 8


def sequential():
    return gate.screen(images)


pool = ThreadPoolExecutor(1)


def overlapped():
    chunks = [images[i : i + CHUNK] for i in range(0, len(images), CHUNK)]

    def prep(chunk):
        return np.stack([gate.preprocessor(b) for b in chunk])

    nxt = pool.submit(prep, chunks[0])
    out = []
    for i in range(len(chunks)):
        pixels = nxt.result()
        if i + 1 < len(chunks):
            nxt = pool.submit(prep, chunks[i + 1])
        out += gate.classify(list(pixels), [""] * len(pixels))
    return out


for f in (sequential, overlapped):
    f()
times: dict[str, list[float]] = {"sequential": [], "overlapped": []}
for r in range(7):
    for name, f in (
        (("sequential", sequential), ("overlapped", overlapped))
        if r % 2 == 0
        else (("overlapped", overlapped), ("sequential", sequential))
    ):
        s = time.perf_counter()
        f()
        times[name].append(time.perf_counter() - s)
for k, v in times.items():
    print(k, f"median {statistics.median(v) * 1000:.0f} ms for 32 images", [round(x, 2) for x in v])
print("ratio", statistics.median(times["sequential"]) / statistics.median(times["overlapped"]))
