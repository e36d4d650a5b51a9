"""Tests of the data path: file checks (byol_fast.datasets.image_check), the index and its cache
(byol_fast.datasets.index, byol_fast.datasets.index_file), the demo dataset (byol_fast.datasets.demo), the CLI (byol_fast.data).

Every kind of file docs/reference.md section 3 warns about is generated small here and must
end up kept (with its real kind) or skipped (with its reason); labels are checked against
torchvision's ImageFolder, an independent implementation of the same layout rules.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from conftest import ROOT
from torchvision.datasets import ImageFolder

from byol_fast import data
from byol_fast.datasets import demo as demo_data, image_check, index_file
from byol_fast.datasets import index as index_module
from byol_fast.datasets.demo import ensure_demo_dataset, make_demo_dataset
from byol_fast.errors import DatasetError
from byol_fast.datasets.samples import Index
from byol_fast.datasets.index import build_index, load_index

REPO = ROOT


# ------------------------------------------------------------------------------ file makers


def _noise(h: int = 64, w: int = 48, seed: int = 0) -> Image.Image:
    """Noise compresses badly, so a JPEG of it has a long scan: truncation lands inside pixel data."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _write(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


# relative path -> expected: ("kept", kind) or ("skipped", reason category)
KINDS_TREE = {
    "good/rgb.JPEG": ("kept", "JPEG:RGB"),
    "good/progressive.JPEG": ("kept", "JPEG:RGB:progressive"),
    "good/cmyk.JPEG": ("kept", "JPEG:CMYK"),
    "good/gray.JPEG": ("kept", "JPEG:L"),
    "good/png_named.JPEG": ("kept", "PNG:RGB"),  # ImageNet's n02105855_2933
    "good/rgba.png": ("kept", "PNG:RGBA"),
    "good/huge.JPEG": ("kept", "JPEG:RGB"),  # 6000 x 6000, ImageNet's largest
    "good/trailing_bytes.JPEG": ("kept", "JPEG:RGB"),  # junk after the end marker is harmless
    "good/gray16.png": ("kept", "PNG:I;16"),
    "good/palette.png": ("kept", "PNG:P"),
    "good/bitmap.bmp": ("kept", "BMP:RGB"),
    "good/photo.webp": ("kept", "WEBP:RGB"),
    "good/scan.tif": ("kept", "TIFF:RGB"),
    "bad/truncated.JPEG": ("skipped", "truncated"),
    "bad/no_end_marker.JPEG": ("skipped", "truncated"),  # DALI's decoder fails on it too
    "bad/text.JPEG": ("skipped", "not an image"),
    "bad/empty.JPEG": ("skipped", "empty file"),
    "bad/animation.jpg": ("skipped", "unsupported format"),  # a GIF: DALI does not decode GIF
    "bad/broken_link.JPEG": ("skipped", "missing"),
    "stray.JPEG": ("skipped", "outside class folders"),
    "empty_class": ("skipped", "empty class folder"),
}


def _make_kinds_tree(root: Path) -> None:
    """One file of every kind in KINDS_TREE, plus a non-image file that must be ignored."""
    img = _noise()
    _save(img, root / "good/rgb.JPEG", "JPEG", quality=90)
    _save(img, root / "good/progressive.JPEG", "JPEG", progressive=True)
    _save(img.convert("CMYK"), root / "good/cmyk.JPEG", "JPEG")
    _save(img.convert("L"), root / "good/gray.JPEG", "JPEG")
    _save(img, root / "good/png_named.JPEG", "PNG")
    _save(img.convert("RGBA"), root / "good/rgba.png", "PNG")
    _save(Image.new("RGB", (6000, 6000), (90, 20, 200)), root / "good/huge.JPEG", "JPEG", quality=50)
    jpeg = _jpeg_bytes(img, quality=95)
    _write(root / "good/trailing_bytes.JPEG", jpeg + b"\0junk" * 10)
    gray16 = Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) * 20)
    _save(gray16, root / "good/gray16.png", "PNG")
    _save(img.convert("P"), root / "good/palette.png", "PNG")
    _save(img, root / "good/bitmap.bmp", "BMP")
    _save(img, root / "good/photo.webp", "WEBP")
    _save(img, root / "good/scan.tif", "TIFF")
    _write(root / "bad/truncated.JPEG", jpeg[: len(jpeg) // 2])
    _write(root / "bad/no_end_marker.JPEG", jpeg[:-2])
    _write(root / "bad/text.JPEG", b"<html>404 Not Found</html>\n")
    _write(root / "bad/empty.JPEG", b"")
    _save(img, root / "bad/animation.jpg", "GIF")
    os.symlink(root / "bad/no_such_target.JPEG", root / "bad/broken_link.JPEG")
    _write(root / "bad/notes.txt", b"not a candidate: ImageFolder ignores it, so do we\n")
    _save(img, root / "stray.JPEG", "JPEG")
    (root / "empty_class").mkdir()


@pytest.fixture(scope="module")
def kinds_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kinds")
    _make_kinds_tree(root)
    return root


@pytest.fixture(scope="module")
def kinds_index(kinds_tree) -> Index:
    return build_index(kinds_tree, workers=1, cache=False, progress=False)


def _small_tree(root: Path, classes=("a", "b"), per_class: int = 3) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            _save(_noise(seed=10 * c + i), root / name / f"{i}.JPEG", "JPEG")
    return root


# ------------------------------------------------------------------------------ file kinds


@pytest.mark.parametrize("rel", sorted(KINDS_TREE))
def test_each_file_kind_is_kept_or_skipped_with_reason(kinds_tree, kinds_index, rel):
    status, expected = KINDS_TREE[rel]
    path = str(kinds_tree / rel)
    kept = dict(zip(kinds_index.files, kinds_index.kinds))
    skipped = dict(kinds_index.skipped)
    if status == "kept":
        assert kept.get(path) == expected, skipped.get(path)
        assert path not in skipped
    else:
        assert path not in kept
        assert skipped[path].split(":")[0] == expected, skipped[path]


def test_non_candidates_are_ignored_and_nothing_else_appears(kinds_tree, kinds_index):
    listed = set(kinds_index.files) | {p for p, _ in kinds_index.skipped}
    assert listed == {str(kinds_tree / rel) for rel in KINDS_TREE}


def test_labels_match_torchvision_imagefolder(kinds_tree, kinds_index):
    reference = ImageFolder(str(kinds_tree), allow_empty=True)
    assert {c: i for i, c in enumerate(kinds_index.classes)} == reference.class_to_idx
    assert "empty_class" in kinds_index.classes  # kept, so labels agree with ImageFolder
    kept = set(kinds_index.files)
    assert [s for s in reference.samples if s[0] in kept] == list(zip(kinds_index.files, kinds_index.labels))


def _dali_decodes(path: str) -> bool:
    """Does DALI's CPU decoder get through this file? (A failure is a pipeline's critical error.)"""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_one():
        encoded, _ = fn.readers.file(files=[path])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    pipe = decode_one()
    try:
        pipe.build()
        pipe.run()
    except RuntimeError:
        return False
    return True


def test_verdicts_agree_with_dali_decoder(kinds_tree, kinds_index):
    """The independent reference: DALI itself (skipped where DALI is not installed)."""
    pytest.importorskip("nvidia.dali")
    verdicts = {p: True for p in kinds_index.files} | {p: False for p, _ in kinds_index.skipped}
    files = {p: ok for p, ok in verdicts.items() if os.path.isfile(p) and not p.endswith("stray.JPEG")}
    assert {p: _dali_decodes(p) for p in files} == files


def test_unreadable_file_is_skipped(tmp_path):
    root = _small_tree(tmp_path, per_class=2)
    locked = root / "a" / "0.JPEG"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: chmod 000 does not stop reading")
        index = build_index(root, workers=1, cache=False, progress=False)
    finally:
        locked.chmod(0o644)
    assert dict(index.skipped)[str(locked)].startswith("unreadable")


def test_permission_error_is_reported_and_never_cached(tmp_path, monkeypatch):
    """Works as root too: the PermissionError is raised by a stand-in for PIL's open."""
    root = _small_tree(tmp_path, per_class=2)
    locked = str(root / "a" / "0.JPEG")
    real_open = Image.open

    def open_or_deny(fp, *args, **kwargs):
        if str(fp) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", open_or_deny)
    first = build_index(root, workers=1, progress=False)
    assert dict(first.skipped)[locked].startswith("unreadable")
    monkeypatch.setattr(Image, "open", real_open)  # permission fixed: size and mtime unchanged
    second = build_index(root, workers=1, progress=False)
    assert second.checked == 1 and locked in second.files


def test_unlistable_subfolder_is_reported(tmp_path, monkeypatch):
    """Works as root too: a stand-in for os.scandir refuses to list the sub-folder."""
    root = _small_tree(tmp_path, per_class=1)
    (root / "b" / "sub").mkdir()
    real_scandir = os.scandir

    def scandir_failing_in_sub(path):
        if str(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(index_module.os, "scandir", scandir_failing_in_sub)
    index = build_index(root, workers=1, cache=False, progress=False)
    reason = dict(index.skipped)[str(root / "b" / "sub")]
    assert reason == "unreadable: cannot list folder (Permission denied)"
    assert len(index.files) == 2


def test_max_pixels_limit_skips_with_clear_reason(tmp_path):
    root = _small_tree(tmp_path, per_class=1)
    _save(Image.new("RGB", (600, 500)), root / "a" / "big.JPEG", "JPEG")
    index = build_index(root, workers=1, cache=False, progress=False, max_pixels=100_000)
    reason = dict(index.skipped)[str(root / "a" / "big.JPEG")]
    assert reason.startswith("too large") and "600x500" in reason


def test_pil_decompression_bomb_guard_never_crashes_the_scan(tmp_path, monkeypatch):
    """Above PIL's limit it warns, above twice the limit it raises: neither may escape."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    root = _small_tree(tmp_path, per_class=1)  # 64 x 48 = 3072 pixels: below PIL's limit
    _save(Image.new("RGB", (120, 120)), root / "a" / "warns.JPEG", "JPEG")  # 14,400: PIL warns
    _save(Image.new("RGB", (200, 200)), root / "a" / "raises.JPEG", "JPEG")  # 40,000: PIL raises
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a leaked warning fails the test
        index = build_index(root, workers=1, cache=False, progress=False)
    assert str(root / "a" / "warns.JPEG") in index.files
    assert dict(index.skipped)[str(root / "a" / "raises.JPEG")].startswith("too large")


# ------------------------------------------------------------------------------ layouts and errors


def test_flat_folder_has_no_classes_and_label_minus_one(tmp_path):
    for i in range(3):
        _save(_noise(seed=i), tmp_path / f"{i}.jpg", "JPEG")
    _write(tmp_path / "broken.jpg", b"\xff\xd8\xff garbage")
    index = build_index(tmp_path, workers=1, cache=False, progress=False)
    assert index.classes == [] and not index.labelled
    assert index.labels == [-1, -1, -1]
    assert index.files == [str(tmp_path / f"{i}.jpg") for i in range(3)]
    assert [p for p, _ in index.skipped] == [str(tmp_path / "broken.jpg")]


def test_missing_folder_error_names_it(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "nope")):
        build_index(tmp_path / "nope", progress=False)


def test_folder_without_images_error_names_it(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "readme.txt").write_text("no images")
    with pytest.raises(DatasetError, match=f"no image files.*{tmp_path}"):
        build_index(tmp_path, workers=1, progress=False)


def test_all_files_bad_error_names_folder_and_report(tmp_path):
    _write(tmp_path / "cls" / "bad.JPEG", b"junk")
    with pytest.raises(DatasetError, match="no decodable images") as err:
        build_index(tmp_path, workers=1, progress=False)
    assert str(tmp_path) in str(err.value) and "report" in str(err.value)


def test_split_root_is_refused(tmp_path):
    _small_tree(tmp_path / "train", per_class=1)
    _small_tree(tmp_path / "val", per_class=1)
    with pytest.raises(DatasetError, match=f"pass one split, e.g. {tmp_path / 'train'}"):
        build_index(tmp_path, workers=1, cache=False, progress=False)


# ------------------------------------------------------------------------------ cache and saved index


def test_second_scan_decodes_nothing(tmp_path, monkeypatch):
    root = _small_tree(tmp_path)
    _write(root / "a" / "bad.JPEG", b"junk")
    first = build_index(root, workers=1, progress=False)
    assert first.checked == 7 and first.index_path == str(root / ".byol_index.json")

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded a file whose verdict was cached")

    monkeypatch.setattr(image_check, "check_image", must_not_decode)
    written = Path(first.index_path).stat().st_mtime_ns
    second = build_index(root, workers=1, progress=False)
    assert (second.checked, second.reused) == (0, 7)
    assert (second.files, second.labels, second.skipped) == (first.files, first.labels, first.skipped)
    assert Path(second.index_path).stat().st_mtime_ns == written  # unchanged, so not rewritten
    (root / "a" / "bad.JPEG").unlink()
    third = build_index(root, workers=1, progress=False)
    assert third.skipped == [] and load_index(third.index_path).skipped == []  # saved again


def test_changed_file_is_decoded_again(tmp_path):
    root = _small_tree(tmp_path)
    build_index(root, workers=1, progress=False)
    changed = root / "b" / "1.JPEG"
    _write(changed, changed.read_bytes()[:100])  # now truncated: new size and mtime
    index = build_index(root, workers=1, progress=False)
    assert index.checked == 1 and dict(index.skipped)[str(changed)].startswith("truncated")


def test_cache_ignored_when_max_pixels_changes_or_file_is_garbage(tmp_path):
    root = _small_tree(tmp_path)
    build_index(root, workers=1, progress=False)
    assert build_index(root, workers=1, progress=False, max_pixels=10**6).checked == 6
    (root / ".byol_index.json").write_text("{not json")
    assert build_index(root, workers=1, progress=False, max_pixels=10**6).checked == 6


def test_read_only_dataset_indexes_into_home_cache(tmp_path, monkeypatch):
    root = _small_tree(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(index_file, "_writable", lambda folder: False)
    index = build_index(root, workers=1, progress=False)
    assert Path(index.index_path).parent == tmp_path / "cache" / "byol_fast"
    assert not (root / ".byol_index.json").exists()
    assert build_index(root, workers=1, progress=False).checked == 0


def test_load_index_from_json_and_report(kinds_tree, kinds_index, tmp_path):
    built = build_index(kinds_tree, workers=1, progress=False)
    loaded = load_index(built.index_path)
    for name in ("root", "files", "labels", "classes", "skipped", "kinds"):
        assert getattr(loaded, name) == getattr(kinds_index, name), name
    report = Path(loaded.report_path).read_text()
    for path, reason in kinds_index.skipped:
        assert f"{reason}\t{path}" in report
    assert str(kinds_tree / "good/png_named.JPEG") in report  # content is not what the name says
    saved = json.loads(Path(built.index_path).read_text())
    assert saved["files"]["path"][0] == os.path.relpath(kinds_index.files[0], kinds_tree)
    assert load_index(kinds_tree, workers=1, progress=False).files == kinds_index.files
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DatasetError, match="not a byol_fast index"):
        load_index(tmp_path / "x.json")


def test_progress_line_on_stderr(tmp_path, capsys):
    build_index(_small_tree(tmp_path), workers=1, cache=False, progress=True)
    err = capsys.readouterr().err
    assert "6/6 files" in err and "files/s" in err and "ETA" in err


# ------------------------------------------------------------------------------ demo dataset


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_dataset_is_deterministic(tmp_path):
    kw = dict(num_classes=3, train_per_class=3, val_per_class=2, seed=5)
    first = _file_hashes(make_demo_dataset(tmp_path / "a", **kw))
    assert first == _file_hashes(make_demo_dataset(tmp_path / "b", **kw))
    assert len(first) == 3 * 5 + 1  # images + demo.json
    assert first != _file_hashes(make_demo_dataset(tmp_path / "c", **{**kw, "seed": 6}))


def test_demo_dataset_defaults_index_cleanly_in_parallel(tmp_path):
    root = make_demo_dataset(tmp_path / "demo")
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert 1e6 < total < 10e6  # a few MB
    train = build_index(root / "train", workers=2, cache=False, progress=False)  # the process pool
    assert (len(train), train.num_classes, train.skipped) == (8 * 64, 8, [])
    assert set(train.kinds) == {"JPEG:RGB"}
    with Image.open(train.files[0]) as img:
        assert img.size == (112, 112)
    reference = ImageFolder(str(root / "train"))
    assert reference.samples == list(zip(train.files, train.labels))
    assert len(build_index(root / "val", workers=1, cache=False, progress=False)) == 8 * 64


def _spectrum_features(path: str, angles: int = 8, radii: int = 6) -> np.ndarray:
    """Grayscale power spectrum pooled into (orientation, frequency) cells: blind to colour."""
    g = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    power = np.abs(np.fft.fftshift(np.fft.fft2(g - g.mean()))) ** 2
    n = g.shape[0]
    fy, fx = np.mgrid[0:n, 0:n] - n // 2
    angle = (np.arctan2(fy, fx) % np.pi) // (np.pi / angles)
    radius = np.minimum(np.hypot(fy, fx) // (n / 2 / radii), radii - 1)
    cell = (angle * radii + radius).astype(int).ravel()
    cells = np.bincount(cell, weights=power.ravel(), minlength=angles * radii)
    return np.log(cells / cells.sum() + 1e-4)


def test_demo_classes_differ_in_grayscale_structure(tmp_path):
    """Independent of colour: nearest class mean on spectrum features, far above chance (1/8)."""
    root = make_demo_dataset(tmp_path / "demo", train_per_class=24, val_per_class=12)
    train = build_index(root / "train", workers=1, cache=False, progress=False)
    val = build_index(root / "val", workers=1, cache=False, progress=False)
    x = np.stack([_spectrum_features(p) for p in train.files])
    means = np.stack([x[np.array(train.labels) == c].mean(0) for c in range(train.num_classes)])
    xv = np.stack([_spectrum_features(p) for p in val.files])
    predicted = np.argmin(((xv[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == np.array(val.labels)).mean() > 0.75  # 0.875 when written


def test_ensure_demo_dataset_is_idempotent_and_atomic(tmp_path, monkeypatch):
    root = tmp_path / "demo"
    kw = dict(num_classes=2, train_per_class=2, val_per_class=1)
    real_write = demo_data._write_demo_class
    calls = []

    def crash_on_second_class(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interrupted run
        real_write(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_write_demo_class", crash_on_second_class)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(root, **kw)
    assert not root.exists() and list(tmp_path.iterdir()) == []  # no half dataset, no leftovers
    monkeypatch.setattr(demo_data, "_write_demo_class", real_write)
    ensure_demo_dataset(root, **kw)
    first = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_demo_dataset(root, **kw) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == first  # nothing rewritten
    with pytest.raises(DatasetError, match="other parameters"):
        ensure_demo_dataset(root, **{**kw, "seed": 1})


# ------------------------------------------------------------------------------ command line


def test_cli_index_prints_summary(kinds_tree, capsys):
    assert data.main(["index", str(kinds_tree), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "kept     13 images" in out and "truncated 2" in out and "classes  3" in out
    assert str(kinds_tree / ".byol_index.json") in out and ".report.txt" in out


@pytest.mark.parametrize("argv, message", [
    (["index", "/no/such/folder"], "dataset folder not found: /no/such/folder"),
    (["index", ".", "--workers", "-1"], "--workers must be >= 0"),
])
def test_cli_user_mistakes_exit_2_with_one_line(argv, message, capsys):
    assert data.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_cli_demo_as_module(tmp_path):
    cmd = [sys.executable, "-m", "byol_fast.data", "demo", str(tmp_path / "d"),
           "--num-classes", "2", "--train-per-class", "2", "--val-per-class", "1"]
    for _ in range(2):  # the second run finds it made
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "d" / "train").rglob("*.JPEG"))) == 4
    bad = subprocess.run(cmd[:4], cwd=REPO, capture_output=True, text=True)  # OUT missing
    assert bad.returncode == 2
