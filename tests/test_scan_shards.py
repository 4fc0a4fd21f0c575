"""`safeclip scan` over WebDataset tar shards and Parquet files: every sample accounted for, corrupt shards
reported, corrected shards that open with webdataset / pyarrow, resume after a crash, and the same
verdicts from the in-process, multi-process and Ray paths."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from images import smooth_images
from safeclip.calibration.shard_scan import InjectedFailure, ShardOptions, scan_shards
from safeclip.calibration.shards import expand_braces, find_shards
from safeclip.runtime import cli
from safeclip.runtime.gate import Gate

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SHARDS = 5
PER_SHARD = 36
BATCH = 8
TAR_PATTERN = "wds/shard-{00000..00006}.tar"


@dataclass
class Expected:
    """What the generator wrote: per shard, the keys in order with the status each must get ("screened"
    for an image, to be flagged or clean), and where a shard stops being readable."""

    tar: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    parquet: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    shard_errors: set[str] = field(default_factory=set)


def photos(count: int, seed: int) -> list[np.ndarray]:
    """Small crops of scikit-image's photographs, resized, with synthetic gradients between them."""
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), np.dstack([data.camera()] * 3)]
    rng = np.random.default_rng(seed)
    out = []
    synthetic = iter(smooth_images(count, 40, 56, seed=seed))
    for i in range(count):
        if i % 4 == 3:
            out.append(next(synthetic))
            continue
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = rng.integers(h // 4, h // 2), rng.integers(w // 4, w // 2)
        y, x = rng.integers(0, h - ch), rng.integers(0, w - cw)
        crop = Image.fromarray(src[y : y + ch, x : x + cw]).resize(
            (int(rng.integers(32, 72)), int(rng.integers(32, 72)))
        )
        out.append(np.asarray(crop.convert("RGB")))
    return out


def encoded(rgb: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt)
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def make_dataset(root: Path) -> Expected:
    """Five img2dataset-style tar shards (jpg + json sidecar + txt), one cut short mid-way, one that is not a
    tar at all, one missing from the brace range's end... and two Parquet files (Hugging Face image structs,
    and paths relative to the file's folder)."""
    expected = Expected()
    (root / "wds").mkdir(parents=True)
    images = iter(photos(SHARDS * PER_SHARD + 80, seed=5))
    for s in range(SHARDS):
        path = root / "wds" / f"shard-{s:05d}.tar"
        rows: list[tuple[str, str]] = []
        with tarfile.open(path, "w") as tar:
            for i in range(PER_SHARD):
                key = f"{s:05d}{i:04d}"
                fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
                image = encoded(next(images), fmt)
                status = "screened"
                if s == 1 and i == 3:
                    image, status = image[: len(image) // 2], "error"  # truncated JPEG
                if s == 1 and i == 4:
                    image, status = b"caption text saved under an image name\n", "not_image"
                if s == 2 and i == 5:
                    ext = "bin"  # named as nothing in particular: the bytes say it is an image
                add(tar, f"{key}.{ext}", image)
                sidecar = {"url": f"https://example.com/{key}.{ext}", "key": key, "caption": f"caption {key}"}
                add(tar, f"{key}.json", json.dumps(sidecar).encode())
                add(tar, f"{key}.txt", f"caption {key}".encode())
                if s == 2 and i == 7:
                    add(tar, f"{key}.second.png", encoded(next(images), "PNG"))
                    status = "not_image"  # two images in one sample: not screened as one
                rows.append((key, status))
            add(tar, "readme.txt", b"this shard was made by a test")  # a sample without an image
            rows.append(("readme", "not_image"))
        expected.tar[str(path)] = rows
    # Shard 3 cut short in its 21st sample: the first 20 stand, then the shard's error.
    cut = root / "wds" / "shard-00003.tar"
    data = cut.read_bytes()
    with tarfile.open(cut) as tar:
        offset = [m for m in tar.getmembers() if m.name.startswith("000030020")][0].offset_data
    cut.write_bytes(data[: offset + 40])
    expected.tar[str(cut)] = expected.tar[str(cut)][:20]
    expected.shard_errors.add(str(cut))
    garbage = root / "wds" / "shard-00005.tar"
    garbage.write_bytes(b"<html>502 Bad Gateway</html>\n" * 40)
    expected.tar[str(garbage)] = []
    expected.shard_errors.add(str(garbage))
    real = root / "wds" / "shard-00006.tar"
    with tarfile.open(real, "w") as tar:
        for i in range(6):
            add(tar, f"last{i}.jpg", encoded(next(images), "JPEG"))
    expected.tar[str(real)] = [(f"last{i}", "screened") for i in range(6)]

    (root / "pq").mkdir()
    rows = []
    structs: list[tuple[str, str]] = []
    for i in range(40):
        key = f"hf{i:03d}"
        cell: dict | None = {"bytes": encoded(next(images), "PNG"), "path": f"{key}.png"}
        status = "screened"
        if i == 6:
            cell, status = None, "no_image"
        if i == 9:
            cell, status = {"bytes": b"%PDF-1.7 not a picture", "path": "x.pdf"}, "not_image"
        rows.append({"key": key, "image": cell, "text": f"text {i}"})
        structs.append((key, status))
    table = pa.Table.from_pylist(rows).replace_schema_metadata({"huggingface": '{"info": {"features": {}}}'})
    pq.write_table(table, root / "pq" / "part-0.parquet", row_group_size=11)
    expected.parquet[str(root / "pq" / "part-0.parquet")] = structs
    (root / "pq" / "img").mkdir()
    by_path = []
    paths: list[tuple[str, str]] = []
    for i in range(12):
        name = f"img/{i}.jpg"
        status = "screened"
        if i == 2:
            status = "not_image"  # named in the table, missing on disk
        else:
            (root / "pq" / name).write_bytes(encoded(next(images), "JPEG"))
        by_path.append({"jpg": name, "url": f"https://example.com/{i}"})
        paths.append((str(i), status))
    pq.write_table(pa.Table.from_pylist(by_path), root / "pq" / "part-1.parquet")
    expected.parquet[str(root / "pq" / "part-1.parquet")] = paths
    return expected


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory) -> tuple[Path, Expected]:
    root = tmp_path_factory.mktemp("shards")
    return root, make_dataset(root)


def inputs(root: Path) -> list[str]:
    return [str(root / TAR_PATTERN), str(root / "pq")]


def counting_gate(engine: Path, threshold: float) -> Gate:
    g = Gate.from_engine(engine, backend="cpu", threshold=threshold, max_batch=BATCH)
    g.engine.calls = []  # type: ignore[attr-defined]
    infer = g.engine.infer
    g.engine.infer = lambda images: (g.engine.calls.append(len(images)), infer(images))[1]  # type: ignore[method-assign]
    return g


@pytest.fixture(scope="module")
def threshold(tiny_engine, shard_data) -> float:
    """The median top probability over the tar shards' first images: about half flagged, half clean."""
    root, _ = shard_data
    g = Gate.from_engine(tiny_engine, backend="cpu", max_batch=BATCH)
    with tarfile.open(root / "wds" / "shard-00000.tar") as tar:
        blobs = [tar.extractfile(m).read() for m in tar.getmembers() if not m.name.endswith((".json", ".txt"))]
    return float(np.median([v.probability for v in g.check(blobs)]))


@pytest.fixture(scope="module")
def reference(tiny_engine, shard_data, threshold, tmp_path_factory):
    """An uninterrupted in-process scan: (out folder, verdict rows, summary)."""
    root, _ = shard_data
    out = tmp_path_factory.mktemp("reference") / "out"
    summary = scan_shards(counting_gate(tiny_engine, threshold), inputs(root), out, ShardOptions(workers=0))
    return out, pq.read_table(out / "verdicts.parquet").to_pylist(), summary


def test_brace_patterns_expand_like_the_shell():
    assert expand_braces("s-{00000..00002}.tar") == ["s-00000.tar", "s-00001.tar", "s-00002.tar"]
    assert expand_braces("a{8..10}/b{0..1}") == ["a8/b0", "a8/b1", "a9/b0", "a9/b1", "a10/b0", "a10/b1"]
    assert expand_braces("x-{train,val}.tar") == ["x-train.tar", "x-val.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_missing_shards_and_empty_folders_are_errors(tmp_path):
    from safeclip.calibration.dataset import DatasetError

    with pytest.raises(DatasetError, match=r"shard-00001\.tar: no such shard"):
        find_shards([str(tmp_path / "shard-{00001..00002}.tar")])
    with pytest.raises(DatasetError, match="no file matches"):
        find_shards([str(tmp_path / "*.tar")])


def test_every_sample_gets_a_row_with_its_status(reference, shard_data):
    """Each sample the generator wrote has a verdict row, in shard order, with the status its content
    calls for; unreadable shards end in a shard_error row and the samples before the damage stand."""
    out, rows, summary = reference
    _, expected = shard_data
    by_shard: dict[str, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(row["shard"], []).append(row)
    assert list(by_shard) == list(expected.tar) + list(expected.parquet)
    for shard, wanted in {**expected.tar, **expected.parquet}.items():
        got = by_shard[shard]
        if shard in expected.shard_errors:
            assert got[-1]["status"] == "shard_error" and got[-1]["key"] is None and got[-1]["error"]
            got = got[:-1]
        assert [r["key"] for r in got] == [k for k, _ in wanted], shard
        for row, (key, status) in zip(got, wanted, strict=True):
            if status == "screened":
                assert row["status"] in ("clean", "flagged") and len(row["sha256"]) == 64, (key, row)
                assert set(row["probabilities"]) >= {row["category"]} and row["error"] is None
            else:
                assert row["status"] == status, (key, row)
            if status in ("not_image", "error"):
                assert row["error"], (key, row)
    statuses = {r["status"] for r in rows}
    assert {"clean", "flagged"} <= statuses  # the threshold splits the photos: both outcomes are exercised

    def row(key: str) -> dict:
        return next(r for r in rows if r["key"] == key)

    assert row("000010003")["error_type"] == "CorruptImage"
    assert "unrecognised data" in row("000010004")["error"]
    assert "2 images in one sample" in row("000020007")["error"]
    assert "no image in the sample" in row("readme")["error"] and "txt" in row("readme")["error"]
    assert "PDF" in row("hf009")["error"]
    assert "cannot read" in row("2")["error"]
    assert row("000020005")["status"] in ("clean", "flagged")  # a `.bin` member is screened by its bytes
    assert row("000000001")["url"] == "https://example.com/000000001.png"
    assert row("000000001")["caption"] == "caption 000000001"
    shard_errors = [r for r in rows if r["status"] == "shard_error"]
    assert {r["shard"] for r in shard_errors} == expected.shard_errors

    c = summary.counts
    assert c["screened"] == c["clean"] + c["flagged"] == sum(r["status"] in ("clean", "flagged") for r in rows)
    assert c["not_image"] == sum(s == "not_image" for v in expected.tar.values() for _, s in v) + 2
    assert c["shard_errors"] == 2 and c["no_image"] == 1 and c["errors"] == 1
    assert summary.exit_status == 2
    written = json.loads((out / "summary.json").read_text())
    assert written["counts"] == c


def test_corrected_shards_hold_exactly_the_kept_samples(reference, shard_data):
    """Rewritten tars open with webdataset and hold the clean samples with every member byte for byte;
    rewritten Parquet files hold the clean and text-only rows with the original schema and metadata."""
    wds = pytest.importorskip("webdataset")
    out, rows, _ = reference
    root, expected = shard_data
    kept = {
        s: [r["key"] for r in rows if r["shard"] == s and r["status"] in ("clean", "no_image")] for s in expected.tar
    }
    for shard in expected.tar:
        corrected = out / "corrected" / Path(shard).name
        samples = list(wds.WebDataset(str(corrected), shardshuffle=False, empty_check=False))
        assert [s["__key__"] for s in samples] == kept[shard], shard
        with tarfile.open(corrected) as tar:
            names = tar.getnames()
        original = {}
        if shard not in expected.shard_errors:
            with tarfile.open(shard) as tar:
                original = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for s in samples:
                for ext, value in s.items():
                    if not ext.startswith("__"):
                        assert value == original[f"{s['__key__']}.{ext}"]
        assert all(n.partition(".")[0] in kept[shard] for n in names)
    for shard in expected.parquet:
        corrected = pq.read_table(out / "corrected" / Path(shard).name)
        source = pq.read_table(shard)
        keep = [r["status"] in ("clean", "no_image") for r in rows if r["shard"] == shard]
        assert corrected.schema == source.schema and corrected.schema.metadata == source.schema.metadata
        assert corrected.to_pylist() == [r for r, k in zip(source.to_pylist(), keep, strict=True) if k]
        assert 0 < corrected.num_rows < source.num_rows


def test_report_gallery_names_shard_and_key(reference):
    out, rows, _ = reference
    page = (out / "report.html").read_text()
    flagged = [r for r in rows if r["status"] == "flagged"]
    first = flagged[0]
    assert f"<code>{Path(first['shard']).name}: {first['key']}</code>" in page
    assert page.count('src="data:image/jpeg;base64,') == len(flagged)  # under the gallery limit: all shown


def test_resume_after_a_crash_redoes_only_unfinished_shards(tiny_engine, shard_data, threshold, reference, tmp_path):
    """A scan stopped after three shards, with a half-written file of a fourth left behind, resumes by
    screening only the remaining shards and ends with the uninterrupted scan's verdicts."""
    root, expected = shard_data
    out = tmp_path / "out"
    with pytest.raises(InjectedFailure):
        scan_shards(
            counting_gate(tiny_engine, threshold), inputs(root), out, ShardOptions(workers=0, fail_after_shards=3)
        )
    done = sorted(p.name for p in (out / "shards").glob("*.done"))
    assert done == ["000000.done", "000001.done", "000002.done"]
    (out / "shards" / "000003.parquet.tmp").write_bytes(b"PAR1 torn")  # a crash mid-write
    (out / "shards" / "000004.parquet").write_bytes(b"PAR1 no marker")  # renamed, marker not yet written

    again = counting_gate(tiny_engine, threshold)
    summary = scan_shards(again, inputs(root), out, ShardOptions(workers=0))
    remaining = [k for s in list(expected.tar)[3:] for k, st in expected.tar[s] if st == "screened"]
    remaining += [k for s in expected.parquet for k, st in expected.parquet[s] if st == "screened"]
    assert sum(again.engine.calls) == len(remaining)
    assert summary.counts["shards_already_done"] == 3
    assert pq.read_table(out / "verdicts.parquet").to_pylist() == reference[1]

    finished = counting_gate(tiny_engine, threshold)
    scan_shards(finished, inputs(root), out, ShardOptions(workers=0))
    assert finished.engine.calls == []


def test_resume_refuses_other_settings(tiny_engine, shard_data, threshold, tmp_path):
    from safeclip.calibration.dataset import DatasetError

    root, _ = shard_data
    out = tmp_path / "out"
    with pytest.raises(InjectedFailure):
        scan_shards(
            counting_gate(tiny_engine, threshold), inputs(root), out, ShardOptions(workers=0, fail_after_shards=1)
        )
    with pytest.raises(DatasetError, match="thresholds differ"):
        scan_shards(counting_gate(tiny_engine, 0.99), inputs(root), out, ShardOptions(workers=0))
    with pytest.raises(DatasetError, match="shards differ"):
        scan_shards(counting_gate(tiny_engine, threshold), [str(root / "pq")], out, ShardOptions(workers=0))


def test_cli_scans_shards_and_exits_2_for_what_it_could_not_screen(
    tiny_engine, shard_data, threshold, tmp_path, capsys
):
    root, _ = shard_data
    out = tmp_path / "out"
    argv = ["scan", "--engine", str(tiny_engine), "--backend", "cpu", "--threshold", str(threshold)]
    code = cli.main([*argv, "--batch-size", str(BATCH), "--workers", "0", *inputs(root), "--out", str(out)])
    assert code == 2
    printed = capsys.readouterr().out
    assert "not images" in printed and "could not be screened" in printed
    assert (out / "verdicts.parquet").exists() and (out / "report.html").exists()

    clean = tmp_path / "clean"
    code = cli.main([*argv[:-1], "1.0", "--workers", "0", str(root / "wds" / "shard-00006.tar"), "--out", str(clean)])
    assert code == 0


@pytest.mark.slow
def test_decoding_processes_give_the_in_process_verdicts(tiny_engine, shard_data, threshold, reference, tmp_path):
    root, _ = shard_data
    out = tmp_path / "out"
    scan_shards(counting_gate(tiny_engine, threshold), inputs(root), out, ShardOptions(workers=2))
    assert pq.read_table(out / "verdicts.parquet").to_pylist() == reference[1]
    for name in os.listdir(reference[0] / "corrected"):
        assert (out / "corrected" / name).read_bytes() == (reference[0] / "corrected" / name).read_bytes()


@pytest.mark.slow
def test_ray_gives_the_local_verdicts(tiny_engine, shard_data, threshold, reference, tmp_path):
    """Ray Data on a local two-CPU Ray (object store bounded) writes the same verdicts, byte for byte the
    same corrected shards, and the same summary as the in-process scan."""
    ray = pytest.importorskip("ray")
    from safeclip.calibration.scan_ray import RayOptions

    root, _ = shard_data
    out = tmp_path / "out"
    ray.init(num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        summary = scan_shards(counting_gate(tiny_engine, threshold), inputs(root), out, ShardOptions(), RayOptions())
    finally:
        ray.shutdown()
    assert pq.read_table(out / "verdicts.parquet").to_pylist() == reference[1]
    for name in os.listdir(reference[0] / "corrected"):
        assert (out / "corrected" / name).read_bytes() == (reference[0] / "corrected" / name).read_bytes()
    assert summary.counts == reference[2].counts


def _descendants(pid: int) -> list[int] | None:
    """Every live process below `pid` (from /proc), or None where there is no /proc."""
    if not Path("/proc/self/stat").exists():
        return None
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


KILLED_SCAN = """
import sys, time
from safeclip.calibration.shard_scan import ShardOptions, scan_shards
from safeclip.runtime.gate import Gate

if __name__ == "__main__":
    engine, threshold, out, *names = sys.argv[1:]
    gate = Gate.from_engine(engine, backend="cpu", threshold=float(threshold), max_batch={batch})
    infer = gate.engine.infer
    def slow(images):  # slow enough that the kill lands mid-scan on any machine
        time.sleep(0.3)
        return infer(images)
    gate.engine.infer = slow
    scan_shards(gate, names, out, ShardOptions(workers=1))
"""


@pytest.mark.slow
def test_a_scan_killed_with_sigkill_resumes_to_the_same_result(tiny_engine, shard_data, threshold, reference, tmp_path):
    root, _ = shard_data
    out = tmp_path / "out"
    script = tmp_path / "scan_script.py"
    script.write_text(textwrap.dedent(KILLED_SCAN.format(batch=BATCH)))
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_engine), str(threshold), str(out), *inputs(root)])
    try:
        deadline = time.monotonic() + 300
        while not (out / "shards" / "000001.done").exists():
            assert proc.poll() is None, "the scan ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        decoders = _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if decoders is not None:  # Linux: the killed scan's decoding processes (and their forkserver) end too
        assert decoders, "the scan had no decoding processes to check"
        deadline = time.monotonic() + 120  # generous: a loaded machine; they exit within a second or so
        while any(Path(f"/proc/{pid}").exists() for pid in decoders):
            assert time.monotonic() < deadline, f"decoding processes outlived the killed scan: {decoders}"
            time.sleep(0.2)
    done = len(list((out / "shards").glob("*.done")))
    assert 2 <= done < len(find_shards(inputs(root)))
    again = counting_gate(tiny_engine, threshold)
    summary = scan_shards(again, inputs(root), out, ShardOptions(workers=0))
    assert summary.counts["shards_already_done"] == done
    assert pq.read_table(out / "verdicts.parquet").to_pylist() == reference[1]


def _conversation(key: str) -> list[dict]:
    return [
        {"from": "human", "value": f"<image>\nWhat is in picture {key}?"},
        {"from": "gpt", "value": f"It shows {key}."},
        {"from": "human", "value": "Anything else?"},
        {"from": "gpt", "value": "No."},
    ]


def make_conversation_shards(root: Path) -> dict[str, list[str]]:
    """LLaVA-style samples in shards: a tar whose JSON sidecars hold conversations (one only a caption), a
    Parquet file with a conversations column of structs (one row null), one with conversations as JSON text.
    Returns the keys that hold a conversation, per shard."""
    images = iter(photos(14, seed=9))
    talking: dict[str, list[str]] = {}
    with tarfile.open(root / "talk.tar", "w") as tar:
        for i in range(5):
            key = f"t{i}"
            add(tar, f"{key}.jpg", encoded(next(images), "JPEG"))
            sidecar = (
                {"id": key, "caption": "no conversation here"}
                if i == 2
                else {"id": key, "conversations": _conversation(key)}
            )
            add(tar, f"{key}.json", json.dumps(sidecar).encode())
    talking[str(root / "talk.tar")] = ["t0", "t1", "t3", "t4"]
    rows = []
    for i in range(5):
        cell = {"bytes": encoded(next(images), "PNG"), "path": None}
        rows.append({"id": f"p{i}", "image": cell, "conversations": None if i == 1 else _conversation(f"p{i}")})
    pq.write_table(pa.Table.from_pylist(rows), root / "talk-structs.parquet")
    talking[str(root / "talk-structs.parquet")] = ["p0", "p2", "p3", "p4"]
    text_rows = [
        {"id": f"j{i}", "image": encoded(next(images), "JPEG"), "conversations": json.dumps(_conversation(f"j{i}"))}
        for i in range(4)
    ]
    text_rows[3]["conversations"] = "not JSON"  # no conversation to correct: dropped
    pq.write_table(pa.Table.from_pylist(text_rows), root / "talk-text.parquet")
    talking[str(root / "talk-text.parquet")] = ["j0", "j1", "j2"]
    return talking


def _refused(key: str, refusal: str) -> list[dict]:
    return [{**t, "value": refusal} if t["from"] == "gpt" else t for t in _conversation(key)]


def test_flagged_conversations_are_kept_with_the_refusal(tiny_engine, tmp_path):
    """Where a shard holds LLaVA conversations, a flagged sample is rewritten as the JSON scan rewrites a
    record: its image kept, every assistant turn replaced by the refusal (category filled in), the human
    turns as they were; a flagged sample without a conversation is dropped; --drop drops them all."""
    wds = pytest.importorskip("webdataset")
    talking = make_conversation_shards(tmp_path)
    flag_all = Gate.from_engine(tiny_engine, backend="cpu", threshold=0.0)
    out = tmp_path / "out"
    refusal = "Refused: {category}."
    summary = scan_shards(flag_all, list(talking), out, ShardOptions(refusal=refusal))
    rows = pq.read_table(out / "verdicts.parquet").to_pylist()
    assert {r["status"] for r in rows} == {"flagged"}
    category = {r["key"]: max(r["flagged_categories"], key=r["probabilities"].__getitem__) for r in rows}
    assert summary.counts["refused"] == sum(map(len, talking.values()))

    original = {}
    with tarfile.open(tmp_path / "talk.tar") as tar:
        original = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    samples = list(wds.WebDataset(str(out / "corrected" / "talk.tar"), shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == talking[str(tmp_path / "talk.tar")]
    for s in samples:
        key = s["__key__"]
        assert s["jpg"] == original[f"{key}.jpg"]  # the image is kept byte for byte
        sidecar = json.loads(s["json"])
        assert sidecar["id"] == key
        assert sidecar["conversations"] == _refused(key, f"Refused: {category[key]}.")

    structs = pq.read_table(out / "corrected" / "talk-structs.parquet")
    assert structs.schema == pq.read_table(tmp_path / "talk-structs.parquet").schema
    got = structs.to_pylist()
    assert [r["id"] for r in got] == talking[str(tmp_path / "talk-structs.parquet")]
    source = {r["id"]: r for r in pq.read_table(tmp_path / "talk-structs.parquet").to_pylist()}
    for r in got:
        assert r["image"] == source[r["id"]]["image"]
        assert r["conversations"] == _refused(r["id"], f"Refused: {category[r['id']]}.")
    text = pq.read_table(out / "corrected" / "talk-text.parquet").to_pylist()
    assert [r["id"] for r in text] == talking[str(tmp_path / "talk-text.parquet")]
    for r in text:
        assert json.loads(r["conversations"]) == _refused(r["id"], f"Refused: {category[r['id']]}.")
    written = json.loads((out / "summary.json").read_text())
    assert written["refusal"] == refusal and "replaced by the refusal" in written["flagged_samples"]

    dropped = tmp_path / "dropped"
    argv = ["scan", "--engine", str(tiny_engine), "--backend", "cpu", "--threshold", "0", "--workers", "0"]
    assert cli.main([*argv, "--drop", *talking, "--out", str(dropped)]) == 1
    assert list(wds.WebDataset(str(dropped / "corrected" / "talk.tar"), shardshuffle=False, empty_check=False)) == []
    assert pq.read_table(dropped / "corrected" / "talk-structs.parquet").num_rows == 0
    with pytest.raises(ValueError, match="may only use"):
        scan_shards(flag_all, list(talking), tmp_path / "bad", ShardOptions(refusal="{user}"))


def _spins(gate: Gate) -> bool:
    options = gate.engine.backend.session.get_session_options()
    try:
        return options.get_session_config_entry("session.intra_op.allow_spinning") != "0"
    except RuntimeError:  # not set: onnxruntime's default, spinning
        return True


def test_the_scan_loads_its_engine_with_sleeping_threads(tiny_engine, tmp_path, monkeypatch):
    """Spinning idle engine threads take the cores the decoding processes need (measured in bench scan):
    `safeclip scan` asks for sleeping ones, for shards and for folders; the gate keeps the default."""
    assert _spins(Gate.from_engine(tiny_engine, backend="cpu"))
    assert not _spins(Gate.from_engine(tiny_engine, backend="cpu", spin_wait=False))
    from safeclip.calibration import scan as scan_module

    made: list[Gate] = []
    real = scan_module.gate_from_args
    monkeypatch.setattr(scan_module, "gate_from_args", lambda args, **kw: made.append(real(args, **kw)) or made[-1])
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(encoded(photos(1, seed=3)[0], "PNG"))
    with tarfile.open(tmp_path / "one.tar", "w") as tar:
        add(tar, "a.png", (images / "a.png").read_bytes())
    argv = ["scan", "--engine", str(tiny_engine), "--backend", "cpu", "--workers", "0"]
    cli.main([*argv, str(images), "--out", str(tmp_path / "folder-out")])
    cli.main([*argv, str(tmp_path / "one.tar"), "--out", str(tmp_path / "shard-out")])
    assert len(made) == 2 and not any(_spins(g) for g in made)
