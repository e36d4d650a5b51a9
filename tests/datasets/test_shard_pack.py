"""Packing into tar shards: against the source files' bytes, Python's tarfile, DALI's own ``wds2idx``
index writer and DALI's webdataset reader."""
import hashlib
import json
import subprocess
import sys
import tarfile

import pytest
from conftest import CHILD_ENV, ROOT, write_noise_jpegs
from PIL import Image

from byol_fast import data
from byol_fast.errors import DatasetError
from byol_fast.datasets.index import build_index
from byol_fast.datasets.shard_pack import IMAGE_EXTS, MANIFEST, pack, parse_size


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """17 images in two classes, one of them a PNG named .JPEG."""
    root = write_noise_jpegs(tmp_path_factory.mktemp("tree") / "train", 16, seed=3)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(root / "c1" / "disguised.JPEG", format="PNG")
    return root


@pytest.fixture(scope="module")
def index(tree):
    return build_index(tree, workers=1, cache=False, progress=False)


def members(shard_dir):
    """{key: {ext: bytes}} over every tar of a shard set, and the tar each key is in."""
    out, where = {}, {}
    for tar_path in sorted(shard_dir.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
                where[key] = tar_path.name
    return out, where


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_every_image_goes_in_once_with_its_bytes_label_and_real_extension(index, tree, tmp_path):
    manifest = pack(index, tmp_path / "s", shard_bytes=4000, seed=0, progress=False)
    got, where = members(tmp_path / "s")
    expected = {digest(open(f, "rb").read()): (label, f) for f, label in zip(index.files, index.labels)}
    seen = {}
    for key, parts in got.items():
        image_ext = [e for e in parts if e != "cls"]
        assert len(image_ext) == 1 and image_ext[0] in IMAGE_EXTS, parts.keys()
        label, path = expected[digest(parts[image_ext[0]])]
        assert int(parts["cls"]) == label
        seen[path] = image_ext[0]
    assert sorted(seen) == sorted(index.files)
    assert seen[str(tree / "c1" / "disguised.JPEG")] == "png"
    assert all(ext == "jpg" for path, ext in seen.items() if path.endswith(".jpg"))
    # The manifest counts what is there, and each tar stays under the limit (or holds one sample).
    assert manifest["num_samples"] == len(index) == sum(s["samples"] for s in manifest["shards"])
    assert json.loads((tmp_path / "s" / MANIFEST).read_text()) == manifest
    assert len(manifest["shards"]) > 2
    for s in manifest["shards"]:
        assert (tmp_path / "s" / s["tar"]).stat().st_size == s["bytes"]
        assert s["bytes"] <= 4000 or s["samples"] == 1
    # The seeded order mixes the classes: not the index's class-sorted order.
    labels_in_order = [int(got[k]["cls"]) for k in sorted(got)]
    assert labels_in_order != sorted(labels_in_order)


def test_same_seed_same_bytes_other_seed_other_order(index, tmp_path):
    """One thread or two, the same seed gives the same files byte for byte; another seed another order."""
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):
        pack(index, tmp_path / name, shard_bytes=11000, seed=seed, workers=workers, progress=False)
    files = lambda n: {p.name: p.read_bytes() for p in sorted((tmp_path / n).glob("shard-*"))}  # noqa: E731
    assert len(files("a")) > 4 and files("a") == files("b")
    assert files("a")["shard-000000.tar"] != files("c")["shard-000000.tar"]


def test_index_files_equal_what_dali_wds2idx_writes(index, tmp_path):
    pack(index, tmp_path / "s", shard_bytes=6000, seed=1, progress=False)
    for tar_path in sorted((tmp_path / "s").glob("*.tar")):
        theirs = tmp_path / (tar_path.stem + ".dali.idx")
        res = subprocess.run([sys.executable, "-m", "wds2idx", str(tar_path), str(theirs)], env=CHILD_ENV,
                             capture_output=True, text=True)
        if res.returncode:  # older DALI wheels install wds2idx as a script only
            res = subprocess.run([str(ROOT / ".venv" / "bin" / "wds2idx"), str(tar_path), str(theirs)],
                                 capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        assert tar_path.with_suffix(".idx").read_text().split() == theirs.read_text().split()


def test_dali_webdataset_reader_reads_every_sample(index, tmp_path):
    from nvidia.dali import fn, pipeline_def

    manifest = pack(index, tmp_path / "s", shard_bytes=6000, seed=2, progress=False)
    tars = [str(tmp_path / "s" / s["tar"]) for s in manifest["shards"]]
    idxs = [str(tmp_path / "s" / s["index"]) for s in manifest["shards"]]

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def read():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=idxs, ext=[";".join(IMAGE_EXTS), "cls"],
                                     missing_component_behavior="error"))

    pipe = read()
    pipe.build()
    got = {}
    for _ in range(manifest["num_samples"]):
        image, cls = pipe.run()
        got[digest(image.as_array()[0].tobytes())] = int(cls.as_array()[0].tobytes())
    expected = {digest(open(f, "rb").read()): label for f, label in zip(index.files, index.labels)}
    assert got == expected


def test_the_command_packs_train_and_val_and_refuses_mistakes(tree, tmp_path, capsys):
    root = tree.parent
    write_noise_jpegs(root / "val", 4, seed=4)
    out = tmp_path / "out"
    assert data.main(["shards", str(root), str(out), "--shard-size", "5KB", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'train'}: 17 images" in printed and f"{out / 'val'}: 4 images" in printed
    assert json.loads((out / "val" / MANIFEST).read_text())["num_samples"] == 4
    assert data.main(["shards", str(root), str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert data.main(["shards", str(root / "train"), str(tmp_path / "x"), "--shard-size", "lots"]) == 2
    assert "--shard-size" in capsys.readouterr().err
    assert data.main(["shards", str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert data.main(["shards", str(root / "train"), str(tmp_path / "a_file")]) == 2
    assert "a_file: a file" in capsys.readouterr().err
    assert data.main(["shards", str(root / "train"), str(root / "train" / "packed")]) == 2
    assert "inside" in capsys.readouterr().err and not (root / "train" / "packed").exists()


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("1GB") == 10**9 and parse_size("256MiB") == 256 * 2**20 and parse_size("1e6") == 10**6
    for bad in ("0MB", "inf", "nan", "1e400", "-5GB", "lots"):
        with pytest.raises(DatasetError, match="--shard-size"):
            parse_size(bad)
