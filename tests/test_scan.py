"""`safeclip scan` over LLaVA-style JSON/JSONL and image folders; outputs, resume, bad input."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from images import encode, smooth_images
from safeclip.calibration.dataset import DatasetError
from safeclip.calibration.scan import DEFAULT_REFUSAL, scan, strongest
from safeclip.runtime import cli
from safeclip.runtime.gate import Gate

IMAGES = 7


def record(i: int, image: str | None) -> dict:
    r = {
        "id": f"sample-{i}",
        "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
            {"from": "gpt", "value": f"Answer {i}."},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "More."},
        ],
    }
    return r if image is None else {**r, "image": image}


@pytest.fixture
def dataset(tmp_path) -> Path:
    """IMAGES image records (images/ under the dataset folder) and one text-only record, as JSONL and JSON."""
    (tmp_path / "images").mkdir()
    for i, img in enumerate(smooth_images(IMAGES, 80, 60, seed=11)):
        (tmp_path / "images" / f"{i}.png").write_bytes(encode(img))
    records = [record(i, f"images/{i}.png") for i in range(IMAGES)]
    records.insert(3, record(99, None))
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def gate(engine: Path, threshold: float) -> Gate:
    g = Gate.from_engine(engine, backend="cpu", threshold=threshold, max_batch=3)
    g.engine.calls = []  # images per engine call, to see what a resumed scan recomputes
    infer = g.engine.infer
    g.engine.infer = lambda images: (g.engine.calls.append(len(images)), infer(images))[1]
    return g


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_all_flagged_gets_refusals_naming_the_category(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    summary = scan(gate(tiny_engine, 0.0), dataset / "data.jsonl", out)
    verdicts = lines(out / "verdicts.jsonl")
    originals = lines(dataset / "data.jsonl")
    assert [v["index"] for v in verdicts] == list(range(IMAGES + 1))
    assert [v["id"] for v in verdicts] == [r["id"] for r in originals]
    screened = [v for v in verdicts if not v.get("no_image")]
    assert len(screened) == IMAGES and all(v["flagged"] and len(v["sha256"]) == 64 for v in screened)
    assert {"id", "image", "flagged", "category", "probability", "probabilities", "sha256"} <= set(screened[0])

    corrected = lines(out / "corrected.jsonl")
    assert len(corrected) == len(originals)
    for before, after, verdict in zip(originals, corrected, verdicts, strict=True):
        if "image" not in before:
            assert after == before  # text-only: nothing to screen, kept as is
            continue
        refusal = DEFAULT_REFUSAL.format(category=strongest(verdict))
        assert [t["value"] for t in after["conversations"] if t["from"] == "gpt"] == [refusal, refusal]
        assert [t for t in after["conversations"] if t["from"] == "human"] == [
            t for t in before["conversations"] if t["from"] == "human"
        ]

    assert summary.counts["flagged"] == IMAGES and summary.exit_status == 1
    written = json.loads((out / "summary.json").read_text())
    assert written["counts"] == summary.counts
    assert sum(written["flagged_by_category"].values()) == IMAGES

    page = (out / "report.html").read_text()
    thumbnails = re.findall(r'src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(thumbnails) == IMAGES and "<script" not in page and "http" not in page
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(thumbnails[0]), np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) <= 48
    # Blurred: far less fine detail (mean |Laplacian|) than the same image merely shrunk.
    source = cv2.imread(str(dataset / "images" / "0.png"))
    shrunk = cv2.resize(source, thumb.shape[1::-1], interpolation=cv2.INTER_AREA)
    detail = lambda img: np.abs(cv2.Laplacian(img.astype(np.float32), cv2.CV_32F)).mean()  # noqa: E731
    assert detail(thumb) < 0.5 * detail(shrunk)


def test_json_with_drop_keeps_only_clean_samples(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    scan(gate(tiny_engine, 0.0), dataset / "data.json", out, drop=True, refusal="never used")
    corrected = json.loads((out / "corrected.json").read_text())
    assert corrected == [r for r in json.loads((dataset / "data.json").read_text()) if "image" not in r]


def test_nothing_flagged_passes_the_dataset_through(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    summary = scan(gate(tiny_engine, 1.0), dataset / "data.json", out)
    assert json.loads((out / "corrected.json").read_text()) == json.loads((dataset / "data.json").read_text())
    assert summary.exit_status == 0 and summary.counts["clean"] == IMAGES and summary.counts["no_image"] == 1


def test_unscreenable_images_are_errors_never_clean(tiny_engine, dataset, tmp_path):
    records = lines(dataset / "data.jsonl") + [record(50, "images/missing.png"), record(51, "images/broken.png")]
    (dataset / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (dataset / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    code = cli.main(
        [
            "scan",
            "--engine",
            str(tiny_engine),
            "--backend",
            "cpu",
            "--threshold",
            "1.0",
            str(dataset / "more.jsonl"),
            "--out",
            str(out),
        ]
    )
    assert code == 2
    errors = {v["id"]: v for v in lines(out / "verdicts.jsonl") if "error" in v}
    assert set(errors) == {"sample-50", "sample-51"}
    assert "cannot read" in errors["sample-50"]["error"] and errors["sample-51"]["error_type"] == "CorruptImage"
    kept = {r["id"] for r in lines(out / "corrected.jsonl")}
    assert not kept & set(errors) and len(kept) == len(records) - 2
    assert [e["id"] for e in json.loads((out / "summary.json").read_text())["errors"]] == ["sample-50", "sample-51"]


def test_resume_screens_only_what_is_missing(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    first = gate(tiny_engine, 0.5)
    scan(first, dataset / "data.jsonl", out)
    assert sum(first.engine.calls) == IMAGES
    complete = (out / "verdicts.jsonl").read_text().splitlines(keepends=True)

    # A crash after four samples (one of them text-only), in the middle of writing the fifth line.
    (out / "verdicts.jsonl").write_text("".join(complete[:4]) + complete[4][:25])
    again = gate(tiny_engine, 0.5)
    summary = scan(again, dataset / "data.jsonl", out)
    assert sum(again.engine.calls) == IMAGES - 3
    assert (out / "verdicts.jsonl").read_text() == "".join(complete)
    assert summary.counts["already_done"] == 4

    done = gate(tiny_engine, 0.5)
    scan(done, dataset / "data.jsonl", out)
    assert done.engine.calls == []


def test_resume_refuses_other_settings_or_another_dataset(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    scan(gate(tiny_engine, 0.5), dataset / "data.jsonl", out)
    with pytest.raises(DatasetError, match="thresholds differ"):
        scan(gate(tiny_engine, 0.7), dataset / "data.jsonl", out)
    shuffled = lines(dataset / "data.jsonl")[::-1]
    (dataset / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shuffled))
    with pytest.raises(DatasetError, match="does not match sample 0"):
        scan(gate(tiny_engine, 0.5), dataset / "data.jsonl", out)


def test_folder_dataset_lists_the_clean_images(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    summary = scan(gate(tiny_engine, 1.0), dataset / "images", out)
    assert (out / "kept.txt").read_text().splitlines() == [f"{i}.png" for i in range(IMAGES)]
    assert summary.counts["samples"] == IMAGES
    scan(gate(tiny_engine, 0.0), dataset / "images", tmp_path / "flagged")
    assert (tmp_path / "flagged" / "kept.txt").read_text() == ""


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": 1, "image": "a.png"}\n\n{"id": 2,\n{"id": 3}\n', r"data\.jsonl:3: not valid JSON"),
        ('{"id": 1, "image": ["a.png", "b.png"]}\n', r"data\.jsonl:1: \"image\" must be a non-empty string"),
        ('["not", "an", "object"]\n', r"data\.jsonl:1: expected a JSON object"),
        ('{"id": 1, "image": "a.png", "conversations": [{"from": "gpt"}]}\n', r"\"conversations\" must be a list"),
        ("", "no samples"),
    ],
)
def test_malformed_jsonl_fails_before_writing_anything(tiny_engine, tmp_path, capsys, content, message):
    (tmp_path / "data.jsonl").write_text(content)
    out = tmp_path / "out"
    code = cli.main(
        ["scan", "--engine", str(tiny_engine), "--backend", "cpu", str(tmp_path / "data.jsonl"), "--out", str(out)]
    )
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_bad_json_file_and_refusal_template(tiny_engine, tmp_path):
    (tmp_path / "data.json").write_text('{"id": 1}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        scan(gate(tiny_engine, 0.5), tmp_path / "data.json", tmp_path / "out")
    with pytest.raises(ValueError, match=re.escape("may only use {category}")):
        scan(gate(tiny_engine, 0.5), tmp_path / "data.json", tmp_path / "out", refusal="no {reason}")
    assert not (tmp_path / "out").exists()


def test_folder_files_are_screened_by_content_not_name(tiny_engine, dataset, tmp_path):
    """Extensionless uploads are screened as the images they are; a text file is reported as not an image
    (never skipped, never clean) and the scan exits 2; the flagged gallery names each image's file."""
    uploads = tmp_path / "uploads"
    (uploads / "nested").mkdir(parents=True)
    for i, name in enumerate(["3f9a2c", "nested/7b1e44", ".hidden"]):
        (uploads / name).write_bytes((dataset / "images" / f"{i}.png").read_bytes())
    (uploads / "notes.jpg").write_text("not a picture, whatever the name says\n")
    out = tmp_path / "out"
    summary = scan(gate(tiny_engine, 0.0), uploads, out)
    verdicts = {v["id"]: v for v in lines(out / "verdicts.jsonl")}
    assert set(verdicts) == {"3f9a2c", "nested/7b1e44", ".hidden", "notes.jpg"}
    assert all(verdicts[n]["flagged"] for n in ("3f9a2c", "nested/7b1e44", ".hidden"))
    assert verdicts["notes.jpg"]["error_type"] == "UnsupportedImage"
    assert summary.counts["not_image"] == 1 and summary.counts["screened"] == 3 and summary.exit_status == 2
    page = (out / "report.html").read_text()
    assert "<code>nested/7b1e44</code>" in page and "<code>3f9a2c</code>" in page


def test_a_scan_that_screened_nothing_exits_2(tiny_engine, tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello\n")
    argv = ["scan", "--engine", str(tiny_engine), "--backend", "cpu", "--threshold", "1.0"]
    assert cli.main([*argv, str(tmp_path / "docs"), "--out", str(tmp_path / "out")]) == 2
    assert "nothing was screened" in capsys.readouterr().err
    # Text-only records: nothing to screen is not the same as clean either.
    (tmp_path / "text.jsonl").write_text(json.dumps(record(1, None)) + "\n")
    assert cli.main([*argv, str(tmp_path / "text.jsonl"), "--out", str(tmp_path / "out2")]) == 2


def test_jsonl_gallery_caption_names_the_image_and_the_record(tiny_engine, dataset, tmp_path):
    out = tmp_path / "out"
    scan(gate(tiny_engine, 0.0), dataset / "data.jsonl", out)
    page = (out / "report.html").read_text()
    assert "<code>images/0.png</code><br>id sample-0" in page
