"""What rebuilding every content part from the part table costs a warm 1-image chat request, side by side.

    .venv/bin/python bench/experiments/part_rebuild.py

Times, in one run and interleaved, three ways to find the images of the same parsed body: `OpenAIChat.images`
(field, message and tool allow-lists, each part rebuilt from parts.CHAT), the walk it replaced (find
`image_url` parts, refuse non-text types; inlined below as it was), and, for scale, the rest of the parse step
every request pays anyway (`jsonbody.parse` + `check_keys` + `refuse_stray_images`). Prints the medians.
"""

from __future__ import annotations

import base64
import json
import statistics
import timeit
from typing import Any

import numpy as np

from safeclip.runtime.preprocess import encode_png
from safeclip.runtime.server import jsonbody
from safeclip.runtime.server.dialects import VOCABULARY
from safeclip.runtime.server.dialects.openai_chat import FREE_FORM, OpenAIChat

REPEATS, NUMBER = 15, 200


def body_bytes() -> bytes:
    rng = np.random.default_rng(0)
    image = encode_png(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8))
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return json.dumps(
        {
            "model": "llava",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this picture?"},
                        {"type": "image_url", "image_url": {"url": url, "detail": "auto"}},
                    ],
                },
            ],
            "temperature": 0.2,
            "max_tokens": 256,
            "stream": True,
        }
    ).encode()


def previous_walk(body: dict[str, Any]) -> list[Any]:
    """The image walk before the part table: a part with an image_url key is an image, text types pass."""
    images = []
    for message in body["messages"]:
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        for part in content:
            kind = part.get("type")
            if kind == "image_url" or "image_url" in part:
                images.append(part["image_url"])
            elif kind not in ("text", "refusal", "input_audio"):
                raise ValueError(kind)
    return images


def main() -> None:
    raw = body_bytes()
    parsed = jsonbody.parse_object(raw)
    dialect = OpenAIChat()
    # One body, as hot in the cache as a request's freshly parsed one: rebuilding a rebuilt part gives the
    # same part, so every call does the whole work.

    def rebuild() -> None:
        dialect.images(parsed, "/v1/chat/completions")

    def before() -> None:
        previous_walk(parsed)

    def rest() -> None:
        body = jsonbody.parse_object(raw)
        jsonbody.check_keys(body, VOCABULARY, FREE_FORM)
        jsonbody.refuse_stray_images(body, {("messages", 1, "content", 1, "image_url", "url")})

    samples: dict[str, list[float]] = {"rebuild": [], "before": [], "rest": []}
    for _ in range(REPEATS):  # interleaved, so load on the machine touches all three alike
        samples["rebuild"].append(timeit.timeit(rebuild, number=NUMBER) / NUMBER)
        samples["before"].append(timeit.timeit(before, number=NUMBER) / NUMBER)
        samples["rest"].append(timeit.timeit(rest, number=20) / 20)
    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
    print(f"body: {len(raw)} bytes, one 336 px PNG image")
    print(f"images() with the part table: {med['rebuild']:.1f} us")
    print(f"the walk it replaced:         {med['before']:.1f} us")
    print(f"added by the allow-lists:     {med['rebuild'] - med['before']:.1f} us")
    print(f"parse + check_keys + stray:   {med['rest']:.1f} us (paid by every request, for scale)")


if __name__ == "__main__":
    main()
