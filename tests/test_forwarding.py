"""Forwarding to hosted providers: images at the upstream's size, in an encoding decoders agree on, within
the provider's limits, the held key sent the provider's way; tested against stubs that apply the
providers' documented rules (provider_upstream.py), with real photographs and the real SDKs as clients.

Photographs are scikit-image's, tiled at native resolution to camera sizes and saved as JPEG.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import textwrap
import urllib.request
from pathlib import Path
from urllib.error import HTTPError

import anthropic
import cv2
import numpy as np
import openai
import pytest
import simplejpeg
from PIL import Image, JpegImagePlugin
from provider_upstream import ANTHROPIC_MAX_IMAGE_BASE64, ProviderUpstream

from bench.fixtures import PHOTOGRAPHS, photograph, tiled_photograph
from images import camera_jpeg
from safeclip.runtime.gate import Gate
from safeclip.runtime.preprocess import DEFAULT_MAX_PIXELS, Preprocessor, decode_image, decode_resized, encode_jpeg
from safeclip.runtime.server import forwarding
from safeclip.runtime.server.config import load_config
from safeclip.runtime.server.forwarding import PRESETS, Budget, preset_for, resolve
from server_helpers import TESTS, RecordingEngine, gate_config, png

GATE_KEY = "gate-key-never-upstream"
PROVIDER_KEY = "sk-provider-held-by-the-gate"
ANTHROPIC_1X = Path(os.environ.get("ANTHROPIC1_VENV", TESTS.parent / ".venv-anthropic1")) / "bin" / "python"
# What decoders with an accurate IDCT (libjpeg-turbo's islow, as in Pillow, OpenCV and simplejpeg) may
# differ by on the forwarded JPEG, and what libjpeg's fast integer IDCT (a speed-for-accuracy option few
# servers choose) may: SECURITY.md states both.
ACCURATE_IDCT_LEVELS = 1
FAST_IDCT_LEVELS = 24


@pytest.fixture(scope="module")
def phone_photo() -> bytes:
    """A 4000 x 3000 JPEG, as a phone takes them."""
    return camera_jpeg(3000, 4000)


# ---------------------------------------------------------------------------------------------------
# Budgets and presets


@pytest.mark.parametrize(
    ("preset", "size", "expected"),
    [
        ("anthropic", (4000, 3000), (1264, 948)),  # 1568 long edge, then 1.2 MP (~1,600 tokens)
        ("anthropic", (1568, 700), (1568, 700)),
        ("anthropic", (3000, 1000), (1568, 522)),
        ("openai", (4000, 3000), (1024, 768)),  # fit 2048 x 2048, then 768 on the short side
        ("openai", (1000, 3000), (682, 2048)),
        ("openai", (800, 600), (800, 600)),  # never enlarged
        ("local", (4000, 3000), (4000, 3000)),
        ("local", (8000, 6000), (4138, 3103)),
    ],
)
def test_budget_sizes_follow_the_documented_rules(preset, size, expected):
    budget = PRESETS[preset].budget
    assert budget.size(*size) == expected
    assert budget.size(*size[::-1]) == expected[::-1]  # symmetric, as decode_resized needs
    w, h = expected
    assert budget.long_edge is None or max(w, h) <= budget.long_edge
    assert budget.short_edge is None or min(w, h) <= budget.short_edge
    assert budget.max_pixels is None or w * h <= budget.max_pixels


def test_budget_keeps_every_bound_on_many_sizes():
    rng = np.random.default_rng(0)
    budget = Budget(long_edge=1568, short_edge=900, max_pixels=1_200_000)
    for w, h in rng.integers(1, 12000, (2000, 2)):
        out = budget.size(int(w), int(h))
        assert max(out) <= 1568 and min(out) <= 900 and out[0] * out[1] <= 1_200_000 or out == (w, h)
        assert out[0] <= w and out[1] <= h and budget.size(int(h), int(w)) == out[::-1]


@pytest.mark.parametrize(
    ("upstream", "preset"),
    [
        ("https://api.anthropic.com", "anthropic"),
        ("https://API.Anthropic.com.", "anthropic"),
        ("https://api.openai.com", "openai"),
        ("https://myres.openai.azure.com/openai", "azure"),
        ("https://openai.azure.com.evil.test", "local"),
        ("https://api.anthropic.com.evil.test", "local"),
        ("http://127.0.0.1:8000", "local"),
        ("", "local"),
    ],
)
def test_presets_are_chosen_from_the_upstream_url(upstream, preset):
    assert preset_for(upstream) == preset
    overrides = {"engine": "e", **({"upstream": upstream} if upstream else {})}
    assert load_config(None, overrides).forward.plan(upstream).preset == preset


def test_forward_config_overrides_the_preset(tmp_path):
    path = tmp_path / "gate.toml"
    path.write_text(
        'engine = "e"\nupstream = "https://api.anthropic.com"\n[forward]\nlong_edge = 1000\nauth = "bearer"\n'
    )
    plan = load_config(path, {}).forward.plan("https://api.anthropic.com")
    assert (plan.preset, plan.budget.long_edge, plan.budget.max_pixels, plan.auth) == (
        "anthropic",
        1000,
        1_200_000,
        "bearer",
    )
    assert plan.limits.max_image_base64 == 5 * 1024 * 1024
    path.write_text('engine = "e"\n[forward]\npreset = "claude"\n')
    with pytest.raises(ValueError, match=r"forward\.preset: 'claude' is not one of"):
        load_config(path, {})


def test_auth_style_by_preset_and_route():
    assert resolve("https://api.anthropic.com").auth_style("openai") == "x-api-key"
    assert resolve("https://api.openai.com").auth_style("anthropic") == "bearer"
    assert resolve("https://r.openai.azure.com").auth_style(None) == "api-key"
    local = resolve("http://127.0.0.1:8000")
    assert (local.auth_style("anthropic"), local.auth_style("openai"), local.auth_style(None)) == (
        "x-api-key",
        "bearer",
        "bearer",
    )


# ---------------------------------------------------------------------------------------------------
# The encoding and the reduced decode


def _photos() -> list[np.ndarray]:
    return [photograph(name) for name in PHOTOGRAPHS] + [tiled_photograph(768, 1024, seed) for seed in range(2)]


def test_photographs_go_as_jpeg_and_graphics_as_png():
    for rgb in _photos():
        data, media_type = forwarding.encode(rgb)
        assert media_type == "image/jpeg" and data[:3] == b"\xff\xd8\xff"
    screenshot = np.full((600, 900, 3), 245, np.uint8)
    screenshot[40:80, 30:870] = (30, 60, 200)
    screenshot[120:560:24, 60:800] = 20  # lines of "text"
    data, media_type = forwarding.encode(screenshot)
    assert media_type == "image/png" and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), screenshot)  # lossless


def test_forwarded_jpeg_is_baseline_444_without_metadata():
    jpeg = encode_jpeg(photograph("chelsea"))
    with Image.open(io.BytesIO(jpeg)) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and not image.info.get("progressive")
        assert JpegImagePlugin.get_sampling(image) == 0  # 4:4:4
        assert not image.info.get("exif") and not image.info.get("icc_profile") and not image.getexif()
    markers = [jpeg[i + 1] for i in range(len(jpeg) - 1) if jpeg[i] == 0xFF and 0xE1 <= jpeg[i + 1] <= 0xEF]
    assert markers == [], "APPn segments other than JFIF's APP0"


def test_decoders_agree_on_the_forwarded_jpeg_within_the_stated_bound():
    """Pillow, OpenCV and simplejpeg (libjpeg-turbo built apart from both) read the same pixels within
    ACCURATE_IDCT_LEVELS; the fast integer IDCT within FAST_IDCT_LEVELS. Real photographs, plus noise and a
    one-pixel chroma pattern, the worst cases for an IDCT and for chroma handling."""
    rng = np.random.default_rng(0)
    pattern = np.zeros((256, 256, 3), np.uint8)
    pattern[::2, ::2] = 255
    pattern[1::2, :, 0] = 255
    worst_accurate = worst_fast = 0
    # Each picture at quality 95, and (photos) with a camera JPEG's own coarser steps (ForwardPicture.tables).
    camera_tables = _tables(_jpeg(photograph("chelsea"), 90))
    pictures = [*_photos(), rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), pattern]
    encoded = [encode_jpeg(rgb) for rgb in pictures] + [encode_jpeg(rgb, floor=camera_tables) for rgb in _photos()]
    for data in encoded:
        pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        turbo = simplejpeg.decode_jpeg(data, colorspace="RGB")
        fast = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
        assert pillow.shape == opencv.shape == turbo.shape == fast.shape
        worst_accurate = max(worst_accurate, int(np.abs(pillow - opencv).max()), int(np.abs(pillow - turbo).max()))
        worst_fast = max(worst_fast, int(np.abs(pillow - fast).max()))
    assert worst_accurate <= ACCURATE_IDCT_LEVELS
    assert worst_fast <= FAST_IDCT_LEVELS


def _jpeg(rgb: np.ndarray, quality: int, subsampling: int = 2, **options) -> bytes:
    """A JPEG as a camera or a browser saves one: 4:2:0 unless told otherwise."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, "JPEG", quality=quality, subsampling=subsampling, **options)
    return out.getvalue()


def _tables(data: bytes) -> tuple[list[int], list[int] | None]:
    with Image.open(io.BytesIO(data)) as image:
        q = image.quantization
        return list(q[0]), (list(q[1]) if len(q) > 1 else None)


def _forwarded(data: bytes, budget: Budget) -> tuple[np.ndarray, bytes]:
    picture, forward = forwarding.prepare(data, "photo", DEFAULT_MAX_PIXELS, budget)
    return np.asarray(picture), base64.b64decode(forward.data.text)


def test_a_jpeg_forwarded_at_its_own_size_is_quantized_with_its_own_steps():
    """No step finer than quality 95's, none finer than the client's: a camera's q90 photo is forwarded in
    under 1.25x its bytes (1.6x at quality 95's steps) at 46 dB or more from the client's pixels, and what
    is screened is still the forwarded file's own decode."""
    budget = PRESETS["anthropic"].budget
    q95 = _tables(encode_jpeg(photograph("chelsea")))
    for name in PHOTOGRAPHS:
        client = _jpeg(photograph(name), 90)
        screened, data = _forwarded(client, budget)
        ours, theirs = _tables(data), _tables(client)
        assert ours[0] == [max(a, b) for a, b in zip(theirs[0], q95[0], strict=True)], name
        assert theirs[1] is not None and ours[1] == [max(a, b) for a, b in zip(theirs[1], q95[1], strict=True)]
        assert ours != q95, name
        assert len(data) < 1.25 * len(client), (name, len(data) / len(client))
        error = screened.astype(float) - decode_image(client, "client").astype(float)
        assert 10 * np.log10(255**2 / np.mean(error**2)) >= 46, name
        assert np.array_equal(screened, decode_image(data, "forwarded")), name
    # Finer than quality 95: quality 95's steps. Resized, reduced or turned: the 8x8 blocks are no longer
    # the client's, and quality 95's steps apply.
    chelsea = photograph("chelsea")
    assert _tables(_forwarded(_jpeg(chelsea, 98), budget)[1]) == q95
    assert _tables(_forwarded(_jpeg(chelsea, 90), Budget(long_edge=400))[1]) == q95
    turned = Image.Exif()
    turned[0x0112] = 6
    assert _tables(_forwarded(_jpeg(chelsea, 90, exif=turned), budget)[1]) == q95
    # Grayscale: its one table for luma, quality 95's for chroma.
    gray = _jpeg(np.asarray(Image.fromarray(chelsea).convert("L")), 80, subsampling=0)
    forwarded_gray = _tables(_forwarded(gray, budget)[1])
    assert forwarded_gray == ([max(a, b) for a, b in zip(_tables(gray)[0], q95[0], strict=True)], q95[1])


def test_reduced_decode_is_used_and_agrees_with_a_full_decode(phone_photo, monkeypatch):
    """A JPEG at least twice the forward size is decoded reduced in the DCT domain (draft), and what comes out
    is within 3 levels on average and 2% of pixels past 16 of the full decode resized the same way."""
    asked = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        asked.append(size)
        return draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    budget = PRESETS["anthropic"].budget
    reduced = decode_resized(phone_photo, "photo", DEFAULT_MAX_PIXELS, budget.size).astype(int)
    assert asked == [(2000, 1500)] and reduced.shape == (948, 1264, 3)
    full = Image.fromarray(decode_image(phone_photo, "photo")).resize(
        (1264, 948), Image.Resampling.BICUBIC, reducing_gap=None
    )
    difference = np.abs(reduced - np.asarray(full).astype(int))
    assert difference.mean() < 3 and (difference > 16).mean() < 0.02, (difference.mean(), (difference > 16).mean())
    asked.clear()
    small = camera_jpeg(300, 400)
    assert decode_resized(small, "small", DEFAULT_MAX_PIXELS, budget.size).shape == (300, 400, 3) and asked == []


def test_exif_turned_jpeg_is_resized_upright():
    image = Image.fromarray(tiled_photograph(600, 1600))
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees: shown 600 wide, 1600 high
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif)
    rgb = decode_resized(out.getvalue(), "turned", DEFAULT_MAX_PIXELS, Budget(long_edge=800).size)
    assert rgb.shape == (800, 300, 3)


# ---------------------------------------------------------------------------------------------------
# Through the gate, to provider-faithful stubs


@pytest.fixture
def provider(servers):
    """provider(name) -> (stub, its URL), applying that provider's rules and accepting PROVIDER_KEY."""

    def go(name: str) -> tuple[ProviderUpstream, str]:
        stub = ProviderUpstream(provider=name, key=PROVIDER_KEY)
        return stub, servers.start(stub.app())

    return go


@pytest.fixture
def gate_for(servers, tiny_engine):
    """gate_for(upstream URL, preset, **config) -> (the gate's URL, its RecordingEngine)."""

    def go(upstream: str, preset: str, **config) -> tuple[str, RecordingEngine]:
        gate = Gate.from_engine(tiny_engine, threshold=1.0)
        engine = RecordingEngine(gate)
        forward = {"preset": preset, **config.pop("forward", {})}
        cfg = gate_config(
            tiny_engine, upstream, api_key=GATE_KEY, upstream_api_key=PROVIDER_KEY, forward=forward, **config
        )
        return servers.start_gate(cfg, gate), engine

    return go


def anthropic_request(images: list[bytes]) -> dict:
    blocks = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/jpeg", "data": base64.b64encode(i).decode()},
        }
        for i in images
    ]
    return {
        "model": "claude",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": [*blocks, {"type": "text", "text": "what?"}]}],
    }


def assert_screened_and_within_budget(stub: ProviderUpstream, engine: RecordingEngine, sent: list[bytes], preset: str):
    """What arrived is not the client's bytes, fits the preset's budget, and is exactly what the engine screened
    (its input made from the arrived file as Pillow decodes it)."""
    budget = PRESETS[preset].budget
    assert len(stub.images) == len(sent)
    preprocessor = Preprocessor(56)  # the tiny engine's
    screened = {hashlib.sha256(i).hexdigest() for i in engine.inputs}
    for arrived, original in zip(stub.images, sent, strict=True):
        assert arrived.data != original
        size = arrived.image.size
        assert budget.size(*size) == size, f"{size} is over the {preset} budget"
        with Image.open(io.BytesIO(original)) as image:
            assert size == budget.size(*image.size)
        engine_input = preprocessor.fit(decode_image(arrived.data, "arrived"))
        assert hashlib.sha256(engine_input.tobytes()).hexdigest() in screened, "the upstream got pixels not screened"


def headers(received) -> dict[str, str]:
    return {name.lower(): value for name, value in received.headers.items()}


def assert_key_handling(stub: ProviderUpstream, header: str, value: str):
    assert stub.received
    for received in stub.received:
        assert headers(received).get(header.lower()) == value
        leaks = [n for n, v in received.headers.items() if GATE_KEY in v]
        assert leaks == [], f"the gate key left the gate in {leaks}"


def test_anthropic_sdk_2x_phone_photo_and_21_photos(provider, gate_for, phone_photo):
    """anthropic 2.x (its key as Bearer): a 4000x3000 photo Anthropic takes directly, then 21 photos of
    1900x1400 (Anthropic: at most 2000 px per side past 20 images) both go through the gate."""
    assert anthropic.__version__.startswith("2."), anthropic.__version__
    stub, url = provider("anthropic")
    base, engine = gate_for(url, "anthropic")
    client = anthropic.Anthropic(base_url=base, api_key=GATE_KEY, max_retries=0, timeout=120)
    assert len(base64.b64encode(phone_photo)) < ANTHROPIC_MAX_IMAGE_BASE64  # Anthropic would take it as sent
    message = client.messages.create(**anthropic_request([phone_photo]))
    assert message.content[0].text == "the upstream model answered", stub.refusals
    assert_screened_and_within_budget(stub, engine, [phone_photo], "anthropic")
    many = [camera_jpeg(1400, 1900, seed) for seed in range(21)]
    stub.images.clear()
    message = client.messages.create(**anthropic_request(many))
    assert message.content[0].text == "the upstream model answered", stub.refusals
    assert_screened_and_within_budget(stub, engine, many, "anthropic")
    assert_key_handling(stub, "x-api-key", PROVIDER_KEY)
    assert all("authorization" not in headers(r) for r in stub.received)


_ANTHROPIC_1X_CLIENT = textwrap.dedent(
    """
    import json, sys
    import anthropic
    base, key, request = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    client = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0, timeout=120)
    message = client.messages.create(**request)
    print(json.dumps({"version": anthropic.__version__, "text": message.content[0].text}))
    """
)


def test_anthropic_sdk_1x_sends_its_key_as_x_api_key(provider, gate_for, phone_photo, tmp_path):
    """anthropic 1.x (its key in X-Api-Key), run from its own venv: the gate takes its key there too, and
    never passes it on."""
    if not ANTHROPIC_1X.exists():
        pytest.fail(f"{ANTHROPIC_1X} is missing; `make install` makes .venv-anthropic1")
    stub, url = provider("anthropic")
    base, engine = gate_for(url, "anthropic")
    request = tmp_path / "request.json"
    request.write_text(json.dumps(anthropic_request([phone_photo])))
    done = subprocess.run(
        [str(ANTHROPIC_1X), "-c", _ANTHROPIC_1X_CLIENT, base, GATE_KEY, str(request)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert answer["version"].startswith("1.") and answer["text"] == "the upstream model answered"
    assert_screened_and_within_budget(stub, engine, [phone_photo], "anthropic")
    assert_key_handling(stub, "x-api-key", PROVIDER_KEY)


def test_gate_key_is_checked_in_x_api_key(provider, gate_for):
    stub, url = provider("anthropic")
    base, _ = gate_for(url, "anthropic")
    client = anthropic.Anthropic(
        base_url=base, api_key=None, auth_token=None, max_retries=0, default_headers={"X-Api-Key": "wrong"}
    )
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert stub.received == []


def test_openai_sdk_ten_camera_photos(provider, gate_for):
    """Ten 4000x3000 photos (under OpenAI's 50 MB as sent) reach OpenAI at its high-detail size."""
    stub, url = provider("openai")
    base, engine = gate_for(url, "openai")
    photos = [camera_jpeg(3000, 4000, seed, quality=85) for seed in range(10)]
    assert sum(len(p) for p in photos) < 50_000_000
    content = [{"type": "text", "text": "compare"}] + [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(p).decode()}}
        for p in photos
    ]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=GATE_KEY, max_retries=0, timeout=300)
    completion = client.chat.completions.create(model="gpt", messages=[{"role": "user", "content": content}])
    assert completion.choices[0].message.content, stub.refusals
    assert stub.refusals == []
    assert_screened_and_within_budget(stub, engine, photos, "openai")
    assert_key_handling(stub, "Authorization", f"Bearer {PROVIDER_KEY}")
    assert all(a.image.size == (1024, 768) for a in stub.images)


def test_azure_gets_the_key_as_api_key(provider, gate_for):
    stub, url = provider("azure")
    base, _ = gate_for(url, "azure")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=GATE_KEY, max_retries=0, timeout=60)
    image = "data:image/png;base64," + base64.b64encode(png(seed=3)).decode()
    client.chat.completions.create(
        model="gpt", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]
    )
    assert stub.refusals == [] and len(stub.images) == 1
    assert_key_handling(stub, "api-key", PROVIDER_KEY)
    assert all("authorization" not in headers(r) for r in stub.received)


def test_client_provider_keys_are_dropped_when_the_gate_holds_one(provider, gate_for):
    stub, url = provider("anthropic")
    base, _ = gate_for(url, "anthropic")
    client = anthropic.Anthropic(
        base_url=base,
        api_key=GATE_KEY,
        max_retries=0,
        default_headers={"api-key": "sk-client-azure", "x-safeclip-api-key": GATE_KEY},
    )
    client.messages.create(model="m", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    received = headers(stub.received[-1])
    assert received["x-api-key"] == PROVIDER_KEY and "api-key" not in received
    assert "anthropic-version" in received  # the client's, passed through


def _noise_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def test_image_over_the_providers_limit_is_a_413_before_the_upstream(provider, gate_for):
    """With forward_original, a PNG of 6.9 MB of base64 would be refused by Anthropic: the gate answers 413 in
    Anthropic's error format, naming the image, and never calls the upstream. Without it, the same image is
    forwarded downscaled and accepted."""
    big = _noise_png(1300, 1300)
    assert len(base64.b64encode(big)) > ANTHROPIC_MAX_IMAGE_BASE64
    body = anthropic_request([big])
    body["messages"][0]["content"][0]["source"]["media_type"] = "image/png"
    stub, url = provider("anthropic")
    base, _ = gate_for(url, "anthropic", proxy={"forward_original": True})
    client = anthropic.Anthropic(base_url=base, api_key=GATE_KEY, max_retries=0, timeout=60)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(**body)
    error = refused.value.body
    assert refused.value.status_code == 413 and error["type"] == "error", error
    assert "messages[0].content[0]" in error["error"]["message"] and "5,242,880" in error["error"]["message"]
    assert stub.received == []
    base, _ = gate_for(url, "anthropic")
    message = anthropic.Anthropic(base_url=base, api_key=GATE_KEY, max_retries=0, timeout=60).messages.create(**body)
    assert message.content[0].text == "the upstream model answered" and stub.refusals == []


def test_request_over_the_providers_limits_is_refused_before_the_upstream(provider, gate_for):
    stub, url = provider("anthropic")
    base, _ = gate_for(url, "anthropic", forward={"max_request_bytes": 20_000})
    client = anthropic.Anthropic(base_url=base, api_key=GATE_KEY, max_retries=0, timeout=60)
    with pytest.raises(anthropic.APIStatusError) as refused:
        client.messages.create(**anthropic_request([camera_jpeg(300, 400)]))
    assert refused.value.status_code == 413 and "20,000" in refused.value.body["error"]["message"]
    base, _ = gate_for(url, "anthropic")
    client = anthropic.Anthropic(base_url=base, api_key=GATE_KEY, max_retries=0, timeout=60)
    tiny = png(seed=5, size=16)
    body = anthropic_request([tiny] * 101)
    for block in body["messages"][0]["content"][:101]:
        block["source"]["media_type"] = "image/png"
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(**body)
    assert "at most 100" in refused.value.body["error"]["message"]
    assert stub.received == []


def test_default_limits_admit_what_the_providers_admit():
    limits = load_config(None, {"engine": "e"}).limits
    assert limits.max_images >= 500 and limits.max_body_bytes >= 50_000_000
    assert limits.max_request_pixels >= 100 * 2000 * 2000  # Anthropic's most: 100 images of 2000 x 2000


def test_anthropic_1x_venv_is_made_by_make_install():
    makefile = (TESTS.parent / "Makefile").read_text()
    assert ".venv-anthropic1" in makefile and "anthropic==1." in makefile
    assert ".venv-anthropic1" in (TESTS.parent / ".gitignore").read_text()


def test_the_reference_decode_of_the_forwarded_file_is_what_is_screened(phone_photo):
    """forwarding.prepare's pixels are the forwarded file decoded by Pillow, not the pixels before encoding."""
    rgb, forward = forwarding.prepare(phone_photo, "photo", DEFAULT_MAX_PIXELS, PRESETS["anthropic"].budget)
    data = base64.b64decode(forward.data.text)
    assert forward.media_type == "image/jpeg" and (forward.width, forward.height) == (1264, 948)
    assert isinstance(rgb, Image.Image)  # passed on as Pillow's image: an array of it would be a copy
    assert np.array_equal(np.asarray(rgb), decode_image(data, "forwarded"))
    assert len(data) < len(phone_photo) / 2


def test_stub_refuses_what_anthropic_refuses(provider):
    """The stub itself applies the rules (otherwise the tests above prove nothing): a mismatched media type,
    an oversized image, and a wrong key are refused."""
    stub, url = provider("anthropic")

    def send(body: dict, key: str = PROVIDER_KEY) -> int:
        req = urllib.request.Request(
            f"{url}/v1/messages",
            json.dumps(body).encode(),
            {"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as reply:
                return reply.status
        except HTTPError as e:
            return e.code

    photo = camera_jpeg(300, 400)
    assert send(anthropic_request([photo])) == 200
    mislabelled = anthropic_request([photo])
    mislabelled["messages"][0]["content"][0]["source"]["media_type"] = "image/png"
    assert send(mislabelled) == 400
    assert send(anthropic_request([photo]), key="sk-other") == 401
    huge = anthropic_request([_noise_png(1300, 1300)])
    huge["messages"][0]["content"][0]["source"]["media_type"] = "image/png"
    assert send(huge) == 400 and "5 MB" in stub.refusals[-1]
    wide = anthropic_request([camera_jpeg(100, 2100, seed) for seed in range(21)])
    assert send(wide) == 400 and "2000 pixels" in stub.refusals[-1]


# ---------------------------------------------------------------------------------------------------
# The LiteLLM guardrail: LiteLLM sends the returned `structured_messages` to the provider


def guardrail_body(*urls: str) -> dict:
    """A guardrail request as LiteLLM 1.106 sends it for a chat completion (images listed twice)."""
    content = [{"type": "text", "text": "what?"}, *({"type": "image_url", "image_url": {"url": u}} for u in urls)]
    return {
        "input_type": "request",
        "litellm_call_id": "call-1",
        "structured_messages": [{"role": "user", "content": content}],
        "images": list(urls),
        "texts": ["what?"],
        "model": "claude",
    }


@pytest.fixture
def guardrail(servers, tiny_engine):
    """guardrail(preset, **config) -> the guardrail URL of a guardrail-only gate (no upstream: LiteLLM has it)
    on the tiny engine, and its RecordingEngine."""

    def go(preset: str, **config) -> tuple[str, RecordingEngine]:
        gate = Gate.from_engine(tiny_engine, threshold=1.0)
        engine = RecordingEngine(gate)
        forward = {"preset": preset, **config.pop("forward", {})}
        base = servers.start_gate(gate_config(tiny_engine, "", forward=forward, **config), gate)
        return f"{base}/beta/litellm_basic_guardrail_api", engine

    return go


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())


def _data_url(data: bytes, media_type: str = "image/jpeg") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def test_guardrail_returns_the_photo_at_the_providers_budget(guardrail, phone_photo):
    """What LiteLLM writes back (structured_messages) and sends on is the screened picture at the preset's
    budget, as a JPEG labelled as one: the 4000x3000 photo becomes Anthropic's 1264x948."""
    url, engine = guardrail("anthropic")
    answer = _post(url, guardrail_body(_data_url(phone_photo)))
    assert answer["action"] == "GUARDRAIL_INTERVENED"
    returned = answer["structured_messages"][0]["content"][1]["image_url"]["url"]
    assert returned.startswith("data:image/jpeg;base64,") and answer["images"] == [returned]
    data = base64.b64decode(returned.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (1264, 948)
    engine_input = Preprocessor(56).fit(decode_image(data, "returned"))
    assert hashlib.sha256(engine_input.tobytes()).hexdigest() in {hashlib.sha256(i).hexdigest() for i in engine.inputs}


def test_guardrail_blocks_what_the_provider_would_refuse(guardrail):
    """An image the provider would refuse as returned (forward_original keeps a client's 6.9 MB-of-base64 PNG),
    more images than it takes, or images past its request size are BLOCKED with the reason, naming the image:
    LiteLLM shows its client a blocked reason, where the provider's refusal would come later and vaguer."""
    big = _data_url(_noise_png(1300, 1300), "image/png")
    url, _ = guardrail("anthropic", proxy={"forward_original": True})
    answer = _post(url, guardrail_body(big))
    assert answer["action"] == "BLOCKED", answer
    assert "structured_messages[0].content[1]" in answer["blocked_reason"] and "5,242,880" in answer["blocked_reason"]
    # The same image screened and returned at Anthropic's size goes through.
    url, _ = guardrail("anthropic")
    assert _post(url, guardrail_body(big))["action"] == "GUARDRAIL_INTERVENED"
    tiny = _data_url(png(seed=5, size=16), "image/png")
    many = _post(url, guardrail_body(*[tiny] * 101))  # the same image 101 times: LiteLLM sends each
    assert many["action"] == "BLOCKED" and "at most 100" in many["blocked_reason"], many
    assert _post(url, guardrail_body(*[tiny] * 100))["action"] == "GUARDRAIL_INTERVENED"
    url, _ = guardrail("anthropic", forward={"max_request_bytes": 20_000})
    photo = _data_url(camera_jpeg(300, 400))
    small = _post(url, guardrail_body(photo))
    assert small["action"] == "BLOCKED" and "20,000" in small["blocked_reason"], small
