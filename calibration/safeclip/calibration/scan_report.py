"""report.html for a scan: one static, self-contained file (no scripts, no external links).

Flagged images appear only as small, heavily blurred JPEG thumbnails embedded as data URIs: enough to
see that a verdict is plausible (a colour, a layout), not to look at the content.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image, ImageFilter

from safeclip.runtime.preprocess import ImageError, Preprocessor

THUMB_SIDE = 48  # pixels on the longest side, before the browser scales it up (blurrier still)
THUMB_BLUR_SIGMA = 3.0  # in thumbnail pixels: a 48 px image blurred this much keeps only blobs of colour
THUMB_QUALITY = 60

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
td, th { border: 1px solid #ccc; padding: 4px 10px; text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 150px; font-size: 12px; overflow-wrap: anywhere; }
figure img { width: 150px; height: 150px; object-fit: contain; background: #eee; }
"""


def blurred_thumbnail(preprocessor: Preprocessor, path: Path) -> str | None:
    """A data URI, or None when the file can no longer be read."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return blurred_thumbnail_from_bytes(preprocessor, data, str(path))


def blurred_thumbnail_from_bytes(preprocessor: Preprocessor, data: bytes, source: str) -> str | None:
    """A data URI for encoded image bytes, or None when they no longer decode."""
    try:
        rgb = preprocessor.decode(data, source)
    except ImageError:
        return None
    height, width = rgb.shape[:2]
    scale = THUMB_SIDE / max(height, width)
    small = Image.fromarray(rgb).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BOX
    )
    blurred = small.filter(ImageFilter.GaussianBlur(THUMB_BLUR_SIGMA))  # Pillow's radius is the sigma
    jpeg = io.BytesIO()
    blurred.save(jpeg, "JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode("ascii")


def render(summary: dict, gallery: list[dict], errors: list[dict], verdicts_file: str = "verdicts.jsonl") -> str:
    e = html.escape
    counts = summary["counts"]
    rows = "".join(f"<tr><th>{e(k.replace('_', ' '))}</th><td>{v:,}</td></tr>" for k, v in counts.items())
    screened = max(counts["screened"], 1)
    by_category = (
        "".join(
            f"<tr><td>{e(name)}</td><td>{n:,}</td><td>{n / screened:.2%}</td></tr>"
            for name, n in sorted(summary["flagged_by_category"].items(), key=lambda kv: -kv[1])
        )
        or "<tr><td colspan=3>none flagged</td></tr>"
    )
    figures = "".join(
        f"<figure>{_img(g['thumbnail'])}<figcaption>{_caption(g)}<br>{e(g['category'])} "
        f"{g['probability']:.3f}</figcaption></figure>"
        for g in gallery
    )
    shown = f"showing {len(gallery):,} of {counts['flagged']:,} flagged samples (blurred on purpose)"
    error_items = "".join(f"<li>{e(str(x['id']))}: {e(str(x['image']))}: {e(x['error'])}</li>" for x in errors)
    unscreened = counts["errors"] + counts.get("not_image", 0) + counts.get("shard_errors", 0)
    thresholds = ", ".join(f"{e(k)} {v:g}" for k, v in summary["thresholds"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>safeclip scan: {e(summary["dataset"])}</title>
<style>{STYLE}</style></head><body>
<h1>safeclip scan</h1>
<p>dataset <code>{e(summary["dataset"])}</code>, engine <code>{e(summary["engine"])}</code>
({e(summary["model_id"])}), thresholds: {thresholds}</p>
<table>{rows}</table>
<h2>Flagged by category</h2>
<table><tr><th>category</th><th>samples</th><th>share of screened</th></tr>{by_category}</table>
<h2>Flagged images</h2><p>{shown}</p>
<div class="grid">{figures}</div>
<h2>Could not be screened</h2>
<p>{unscreened:,} samples (dropped from the corrected dataset; all listed in {e(verdicts_file)})</p>
<ul>{error_items}</ul>
</body></html>
"""


def _caption(g: dict) -> str:
    """The image (its path, or shard and key) first: that is what a reviewer opens; the id beside it."""
    image, id_ = str(g.get("image") or ""), str(g["id"])
    if image and image != id_:
        return f"<code>{html.escape(image)}</code><br>id {html.escape(id_)}"
    return f"<code>{html.escape(id_)}</code>"


def _img(uri: str | None) -> str:
    return f'<img src="{uri}" alt="blurred thumbnail">' if uri else "<p>(image no longer readable)</p>"
