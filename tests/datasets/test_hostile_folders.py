"""Hostile dataset folders and files: every one ends, bounded, in an index or in one line naming the file.

Links that loop or lead to a sibling class, links out of the root, paths in an index file or a shard
manifest that climb out of the dataset, JSON nested 100,000 deep, an index file missing a key or
with labels past its classes, a file name that is not UTF-8, and a small PNG whose header promises
10,000 x 10,000 pixels (never decoded)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import CHILD_ENV, ROOT, pack_folder, write_noise_jpegs
from PIL import Image, ImageFile

from byol_fast import data
from byol_fast.datasets import image_check
from byol_fast.datasets.index import build_index, load_index
from byol_fast.datasets.shard_pack import MANIFEST
from byol_fast.datasets.shard_set import is_shard_set, open_shard_set
from byol_fast.errors import DatasetError


def _tree(tmp_path: Path, count: int = 4) -> Path:
    return write_noise_jpegs(tmp_path / "data", count)


def _index(root: Path, **kw):
    return build_index(root, workers=1, cache=kw.pop("cache", False), progress=False, **kw)


def _one_line(call, *words) -> str:
    with pytest.raises(DatasetError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


# ------------------------------------------------------------------------------ links in the tree


def test_two_links_to_the_class_folder_itself_end_fast_and_count_each_image_once(tmp_path):
    root = _tree(tmp_path)
    os.symlink(".", root / "c0" / "a")
    os.symlink(".", root / "c0" / "b")
    start = time.monotonic()
    index = _index(root)
    assert time.monotonic() - start < 5
    assert sorted(index.files) == sorted(str(p) for p in root.rglob("*.jpg") if "/a/" not in str(p)
                                         and "/b/" not in str(p))
    assert len(index.files) == 4
    reasons = dict(index.skipped)
    assert reasons[str(root / "c0" / "a")].startswith("folder link") and str(root / "c0" / "b") in reasons


def test_a_link_to_a_sibling_class_counts_its_images_once_in_their_own_class(tmp_path):
    root = _tree(tmp_path)
    os.symlink("../c1", root / "c0" / "other")
    (root / "c2").symlink_to(root / "c1")  # a class folder that is a link into the dataset
    index = _index(root)
    assert len(index.files) == 4 and index.classes == ["c0", "c1", "c2"]
    assert [y for f, y in zip(index.files, index.labels) if "/c1/" in f] == [1, 1]
    assert {reason.split(":")[0] for _, reason in index.skipped} == {"folder link"}


def test_a_folder_link_out_of_the_root_is_reported_and_a_file_link_counts_once(tmp_path):
    """A link to a file may lead anywhere (subsets are often made of links into a shared copy) and
    counts once; a link to a folder inside a class folder is never followed."""
    root = _tree(tmp_path)
    outside = write_noise_jpegs(tmp_path / "elsewhere", 2)
    os.symlink(outside / "c0" / "0.jpg", root / "c0" / "out.jpg")
    os.symlink(outside / "c0" / "0.jpg", root / "c1" / "out_again.jpg")  # the same outside file twice
    os.symlink(outside / "c1", root / "c1" / "outdir")
    os.link(root / "c0" / "0.jpg", root / "c0" / "hard.jpg")  # the same file twice: counted once
    index = _index(root)
    assert len(index.files) == 5 and str(root / "c0" / "out.jpg") in index.files
    reasons = dict(index.skipped)
    assert reasons[str(root / "c1" / "out_again.jpg")] == f"duplicate: the same file as {root / 'c0' / 'out.jpg'}"
    assert reasons[str(root / "c1" / "outdir")].startswith("outside the dataset")
    assert reasons[str(root / "c0" / "hard.jpg")] == f"duplicate: the same file as {root / 'c0' / '0.jpg'}"


def test_a_class_folder_linked_from_elsewhere_is_part_of_the_dataset(tmp_path):
    """The usual way to assemble a subset: class folders that are links to a larger dataset's."""
    big = write_noise_jpegs(tmp_path / "big", 4)
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "c1").symlink_to(big / "c1")
    index = _index(subset)
    assert index.classes == ["c1"] and len(index.files) == 2 and index.skipped == []


def test_a_file_name_that_is_not_utf8_is_skipped_and_reported_once_by_its_bytes(tmp_path):
    root = _tree(tmp_path)
    os.rename(root / "c0" / "0.jpg", os.fsencode(root / "c0") + b"/caf\xe9.jpg")
    os.mkdir(os.fsencode(root / "c1") + b"/dir\xff")
    index = _index(root, cache=True)
    skipped = [(p, r) for p, r in index.skipped if r.startswith("not UTF-8")]
    assert [p for p, _ in skipped] == [str(root / "c0") + "/caf\\xe9.jpg", str(root / "c1") + "/dir\\xff"]
    assert len(index.files) == 3
    report = Path(index.report_path).read_text()
    assert report.count("caf\\xe9.jpg") == 1
    assert load_index(index.index_path).skipped == index.skipped


# ------------------------------------------------------------------------------ the pixel budget


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 8 x 8 PNG whose header (IHDR, CRC fixed) says ``width`` x ``height``."""
    Image.new("RGB", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    path.write_bytes(bytes(raw))
    return path


def test_a_png_claiming_10000_by_10000_is_over_the_budget_and_never_decoded(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    bomb = _png_claiming(root / "c0" / "bomb.png", 10_000, 10_000)
    assert bomb.stat().st_size < 1000

    def no_decoding(self, *args, **kwargs):
        raise AssertionError(f"decoded {self.size}")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    ok, reason = image_check.check_image(str(bomb))
    assert not ok and reason.startswith("too large: 10000x10000") and "300,000,000 bytes" in reason
    assert image_check.MAX_PIXELS * image_check.DECODED_CHANNELS == image_check.MAX_DECODED_BYTES
    monkeypatch.undo()
    index = _index(root)
    assert dict(index.skipped)[str(bomb)].startswith("too large") and index.skip_counts()["too large"] == 1


# ------------------------------------------------------------------------------ the index file


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict]:
    index = _index(_tree(tmp_path), cache=True)
    path = Path(index.index_path)
    return path, json.loads(path.read_text())


def _edited(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


@pytest.mark.parametrize("bad, key", [("../../etc/passwd.jpg", "files.path[0]"), ("/etc/passwd", "files.path[0]")])
def test_an_index_file_path_out_of_the_root_is_refused(saved, bad, key):
    path, doc = saved
    doc["files"]["path"][0] = bad
    _one_line(lambda: load_index(_edited(path, doc)), str(path), key, "inside")


def test_an_index_file_without_root_or_with_labels_past_its_classes_is_refused(saved):
    path, doc = saved
    _one_line(lambda: load_index(_edited(path, {k: v for k, v in doc.items() if k != "root"})), str(path),
              "root: missing")
    doc["files"]["label"][1] = 5
    _one_line(lambda: load_index(_edited(path, doc)), str(path), "files.label[1] = 5", "2 classes")
    doc["files"]["label"][1] = "0"
    _one_line(lambda: load_index(_edited(path, doc)), str(path), "files.label[1]: expected int")


def test_an_index_file_nested_100000_deep_is_refused_naming_it(saved):
    path, _ = saved
    _edited(path, "[" * 100_000 + "]" * 100_000)
    _one_line(lambda: load_index(path), str(path), "nested deeper than 32")
    # as a cache it is ignored: the folder is scanned again
    root = path.parent
    assert _index(root, cache=True).checked == 4


def test_the_command_refuses_a_bad_index_file_in_one_line(saved, tmp_path):
    path, doc = saved
    doc["files"]["path"][0] = "../x.jpg"
    _edited(path, doc)
    done = subprocess.run([sys.executable, "-m", "byol_fast.data", "shards", str(path), str(tmp_path / "s")],
                          cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {path}: files.path[0] = '../x.jpg' is a path climbing out "
                                        f"with '..'; every path in it must stay inside {path.parent}"]


# ------------------------------------------------------------------------------ the shard manifest


@pytest.fixture
def shards(tmp_path) -> Path:
    return pack_folder(write_noise_jpegs(tmp_path / "src", 4), tmp_path / "shards", 10**6)


@pytest.mark.parametrize("key, bad", [("tar", "../x.tar"), ("index", "/etc/passwd")])
def test_a_manifest_path_out_of_the_set_is_refused(shards, key, bad):
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["shards"][0][key] = bad
    _edited(shards / MANIFEST, manifest)
    _one_line(lambda: open_shard_set(str(shards)), str(shards / MANIFEST), f"shards.{key}[0]", repr(bad))


def test_a_manifest_nested_100000_deep_is_refused_naming_it(shards, capsys):
    _edited(shards / MANIFEST, "[" * 100_000 + "]" * 100_000)
    _one_line(lambda: open_shard_set(str(shards)), str(shards / MANIFEST), "nested deeper than 32")
    assert not is_shard_set(str(shards))
    assert data.main(["verify", str(shards)]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: ")


def test_an_index_file_member_named_out_of_its_sample_is_refused(shards):
    idx = shards / "shard-000000.idx"
    lines = idx.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-1] + ["../../x.cls"])  # the label member's name
    idx.write_text("\n".join(lines) + "\n")
    _one_line(lambda: open_shard_set(str(shards)), str(idx), "line 2", "../../x.cls")
