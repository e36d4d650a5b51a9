"""A flat validation folder labelled by the files ImageNet's downloads keep its labels in
(byol_fast.datasets.label_files, through byol_fast.datasets.index): the ILSVRC2012 devkit's ground
truth and meta.mat, Kaggle's LOC_val_solution.csv, mmpretrain's annotation lists.

Each dataset is made small here: train/ class folders named after synsets, a flat val/ of
``ILSVRC2012_val_<i>.JPEG`` images each given a synset, and the label file in the form under test.
The label each image must get is worked out here from the synset it was given (its place among
the sorted synsets, the ImageFolder rule), and checked against torchvision's ImageFolder over the
same images sorted into class folders.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL
from PIL import Image
from scipy.io import savemat
from torchvision.datasets import ImageFolder

from byol_fast import data, linear_eval
from byol_fast.config import load_config
from byol_fast.datasets import label_files
from byol_fast.datasets.index import build_index, load_index
from byol_fast.datasets.open_dataset import checked_dataset
from byol_fast.datasets.shard_pack import MANIFEST
from byol_fast.errors import DatasetError
from byol_fast.models.byol import BYOL
from byol_fast.runtime.dist import DistInfo
from byol_fast.train import knn_monitor

# The devkit's IDs do not follow the synsets' sorted order (ID 1 is n02119789): nor do these.
SYNSETS = {1: "n02119789", 2: "n01440764", 3: "n04591713"}
# Synset of val image i (ILSVRC2012_val_0000000<i+1>): two of each class.
VAL_SYNSETS = ["n04591713", "n01440764", "n02119789", "n01440764", "n04591713", "n02119789"]
# Inner nodes of the devkit's hierarchy: in meta.mat, never a class.
INNER = {1001: "n00001740", 1002: "n00002684"}
FORMS = ["devkit", "kaggle", "meta_list", "val_list", "kaggle_tree"]


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i + 1:08d}"


def expected_label(synset: str) -> int:
    """The reference: a synset's place among train/'s folder names, sorted."""
    return sorted(SYNSETS.values()).index(synset)


def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 28, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def _write_meta_mat(path: Path, compress: bool = True, extra: dict | None = None) -> None:
    """A meta.mat in the devkit's layout: a synsets struct array (N x 1), leaves then inner nodes."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, 0) for i, w in SYNSETS.items()] + [(i, w, 2) for i, w in INNER.items()]
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for r, (ilsvrc_id, wnid, children) in enumerate(rows):
        synsets[r, 0] = (float(ilsvrc_id), wnid, f"words of {wnid}", "a gloss", float(children),
                         np.array([1.0, 2.0][:children]), 0.0, 1300.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": synsets, **(extra or {})}, do_compression=compress)


def make_dataset(root: Path, form: str) -> Path:
    """train/ (two images per synset folder) and a flat val/ labelled in ``form``; returns the folder
    holding train/ and val/."""
    top = root
    if form == "kaggle_tree":  # Kaggle's download: the splits three folders below its CSV files
        root = root / "ILSVRC" / "Data" / "CLS-LOC"
    for k, synset in enumerate(SYNSETS.values()):
        for j in range(2):
            _jpeg(root / "train" / synset / f"{synset}_{j}.JPEG", seed=100 + 10 * k + j)
    for i, _ in enumerate(VAL_SYNSETS):
        _jpeg(root / "val" / f"{val_name(i)}.JPEG", seed=i)
    order = [4, 0, 5, 2, 1, 3]  # the label files need not follow the images' order
    if form in ("kaggle", "kaggle_tree"):
        write_csv(top / "LOC_val_solution.csv", [[val_name(i), f"{VAL_SYNSETS[i]} 10 20 30 40"] for i in order])
    elif form == "devkit":
        by_synset = {w: i for i, w in SYNSETS.items()}
        devkit = root / "ILSVRC2012_devkit_t12" / "data"
        devkit.mkdir(parents=True)
        (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text(
            "".join(f"{by_synset[s]}\n" for s in VAL_SYNSETS))
        _write_meta_mat(devkit / "meta.mat")
    else:
        lines = "".join(f"{val_name(i)}.JPEG {expected_label(VAL_SYNSETS[i])}\n" for i in order)
        path = root / "meta" / "val.txt" if form == "meta_list" else root / "val_list.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(lines)
    return root


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["ImageId", "PredictionString"], *rows])


def index_of(folder: Path, **kw):
    return build_index(folder, workers=1, progress=False, **kw)


# ------------------------------------------------------------------------------ each form, found by itself


@pytest.mark.parametrize("form", FORMS)
def test_each_form_is_found_and_gives_each_image_its_synsets_class(tmp_path, form):
    root = make_dataset(tmp_path, form)
    index = index_of(root / "val")
    assert index.classes == sorted(SYNSETS.values()) == index_of(root / "train").classes
    names = [Path(f).stem for f in index.files]
    assert names == [val_name(i) for i in range(len(VAL_SYNSETS))]
    assert index.labels == [expected_label(s) for s in VAL_SYNSETS]
    kind = {"devkit": "devkit", "kaggle": "kaggle_csv", "kaggle_tree": "kaggle_csv"}.get(form, "list")
    assert index.labels_from["kind"] == kind and index.labels_from["classes_from"] == str(root / "train")
    assert "labels   " in index.summary()

    # The same images sorted into class folders, read by torchvision: the same label per image.
    for f, s in zip(sorted((root / "val").glob("*.JPEG")), VAL_SYNSETS):
        (tmp_path / "tree" / s).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, tmp_path / "tree" / s / f.name)
    reference = {Path(p).stem: label for p, label in ImageFolder(str(tmp_path / "tree")).samples}
    assert dict(zip(names, index.labels)) == reference


def test_a_later_load_reads_the_recorded_label_file(tmp_path):
    """A label file named on the command line (somewhere detection would not look) is recorded in the
    index; a later scan without it, as every command does, labels the folder from the same file."""
    root = make_dataset(tmp_path, "kaggle")
    elsewhere = tmp_path / "downloads" / "solution.csv"
    elsewhere.parent.mkdir()
    (tmp_path / "LOC_val_solution.csv").rename(elsewhere)
    assert not index_of(root / "val", cache=False).labelled  # nothing beside val/: unlabelled, as before
    first = index_of(root / "val", labels=elsewhere)
    saved = json.loads(Path(first.index_path).read_text())
    assert saved["labels_from"]["files"] == [str(elsewhere)]
    again = load_index(root / "val", workers=1, progress=False)
    assert again.labels == first.labels == [expected_label(s) for s in VAL_SYNSETS] and again.checked == 0
    from_json = load_index(first.index_path)
    assert from_json.labels == first.labels and from_json.labels_from == first.labels_from
    elsewhere.unlink()
    with pytest.raises(DatasetError, match=f"took the labels from {elsewhere}, which is gone"):
        index_of(root / "val")


def test_a_class_tree_keeps_its_folders_and_a_test_folder_stays_unlabelled(tmp_path):
    """Label files apply to a flat folder with a train/ beside it only, and Kaggle's or the devkit's to
    ILSVRC2012_val_* images."""
    root = make_dataset(tmp_path, "kaggle")
    train = index_of(root / "train")
    assert train.labels_from is None and train.labels == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DatasetError, match="has class folders, which are its labels"):
        index_of(root / "train", labels=tmp_path / "LOC_val_solution.csv")
    _jpeg(root / "test" / "ILSVRC2012_test_00000001.JPEG", seed=50)
    test = index_of(root / "test")
    assert not test.labelled and test.labels == [-1]
    shutil.rmtree(root / "train")  # no train/ to name the classes: val/ indexes as it did before, unlabelled
    assert index_of(root / "val").labels == [-1] * len(VAL_SYNSETS)


# ------------------------------------------------------------------------------ every mistake: one line naming the file


def _csv_rows(root: Path) -> tuple[Path, list[list[str]]]:
    path = root / "LOC_val_solution.csv"
    return path, list(csv.reader(path.read_text().splitlines()))[1:]


def _missing(root):
    (root / "val" / f"{val_name(2)}.JPEG").unlink()
    return root / "LOC_val_solution.csv", f":5: {val_name(2)} is listed but not in {root / 'val'}"


def _unlisted(root):
    """An image the label file does not list: the message names the image first, then the file."""
    _jpeg(root / "val" / "ILSVRC2012_val_00000099.JPEG", seed=99)
    return root / "val" / "ILSVRC2012_val_00000099.JPEG", f"JPEG: not listed in {root / 'LOC_val_solution.csv'}, so"


def _unknown_synset(root):
    path, rows = _csv_rows(root)
    rows[1][1] = "n09999999 1 2 3 4"
    write_csv(path, rows)
    return path, f":3: {rows[1][0]} has synset n09999999, which is not a class folder of {root / 'train'}"


def _twice(root):
    path, rows = _csv_rows(root)
    write_csv(path, rows + [rows[0]])
    return path, f":8: {rows[0][0]} is listed twice \\(first on line 2\\)"


def _path_in_csv(root):
    path, rows = _csv_rows(root)
    rows[0][0] = "../train/x"
    write_csv(path, rows)
    return path, ":2: '../train/x' is not a plain image name"


def _list_with(root, line: str, at: int = 3):
    """meta/val.txt with its line ``at`` replaced by ``line``."""
    path = root / "meta" / "val.txt"
    lines = path.read_text().splitlines()
    lines[at - 1] = line
    path.write_text("\n".join(lines) + "\n")
    return path


def _dot_dot(root):
    up = "../train/n01440764/n01440764_0.JPEG"
    return _list_with(root, f"{up} 0"), f":3: '{up}' is a path climbing out with '..'"


def _absolute(root):
    return _list_with(root, f"{root / 'val' / val_name(5)}.JPEG 1"), ":3: '/.*' is an absolute path"


def _link_out(root):
    """A listed image that is a link to a file outside val/ (here one of train/'s)."""
    image = root / "val" / f"{val_name(0)}.JPEG"
    image.unlink()
    image.symlink_to(root / "train" / "n01440764" / "n01440764_0.JPEG")
    return root / "meta" / "val.txt", f":[0-9]: {image.name} is a link leading out of {root / 'val'}"


def _class_out_of_range(root):
    return _list_with(root, f"{val_name(5)}.JPEG 3"), f":3: {val_name(5)}.JPEG has class 3, but {root / 'train'} has 3"


def _bad_line(root):
    return _list_with(root, f"{val_name(5)}.JPEG"), ":3: expected 'relative/path label'"


def _unknown_id(root):
    path = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    path.write_text(path.read_text().replace("1\n", "7\n", 1))
    return path, ":[0-9]: ID 7 of ILSVRC2012_val_0000000[0-9] is not a synset of .*meta.mat"


def _inner_node(root):
    path = root / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    path.write_text("1001\n" + "".join(path.read_text().splitlines(keepends=True)[1:]))
    return path, f":1: {val_name(0)} has synset n00001740, which is not a class folder"


def _not_a_mat(root):
    path = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    return path, "not a readable MATLAB v5 file"


def _mat_bomb(root):
    """A meta.mat of a few hundred kilobytes that inflates to 80 MB."""
    path = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    _write_meta_mat(path, extra={"padding": np.zeros(10 * 2**20)})
    assert path.stat().st_size < 2**20
    return path, "its variables inflate to more than 64 MB"


def _mat_without_synsets(root):
    path = root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat"
    savemat(path, {"classes": np.arange(3.0)})
    return path, "no 'synsets' struct with ILSVRC2012_ID and WNID"


def _flat_train(root):
    for f in list((root / "train").rglob("*.JPEG")):
        f.rename(root / "train" / f.name)
    for synset in SYNSETS.values():
        (root / "train" / synset).rmdir()
    return root / "LOC_val_solution.csv", f"need the class folders of {root / 'train'}, and there are none"


def _bad_header(root):
    path = root / "LOC_val_solution.csv"
    path.write_text("id,label\n" + "".join(path.read_text().splitlines(keepends=True)[1:]))
    return path, ":1: expected the header ImageId,PredictionString"


MISTAKES = [("kaggle", _missing), ("kaggle", _unlisted), ("kaggle", _unknown_synset), ("kaggle", _twice),
            ("kaggle", _path_in_csv), ("kaggle", _flat_train), ("kaggle", _bad_header),
            ("meta_list", _dot_dot), ("meta_list", _absolute), ("meta_list", _link_out),
            ("meta_list", _class_out_of_range), ("meta_list", _bad_line),
            ("devkit", _unknown_id), ("devkit", _inner_node), ("devkit", _not_a_mat), ("devkit", _mat_bomb),
            ("devkit", _mat_without_synsets)]


@pytest.mark.parametrize("form, mistake", MISTAKES, ids=[m.__name__.strip("_") for _, m in MISTAKES])
def test_each_mistake_is_one_line_naming_the_file_and_the_entry(tmp_path, form, mistake, capsys):
    root = make_dataset(tmp_path, form)
    path, message = mistake(root)
    with pytest.raises(DatasetError, match=message) as err:
        index_of(root / "val")
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    # The command: exit 2, one line (after its progress line), no traceback.
    assert data.main(["index", str(root / "val"), "--workers", "1"]) == 2
    printed = capsys.readouterr().err.splitlines()
    assert printed[-1] == f"error: {err.value}" and printed[:-1] == [f"indexing {root / 'val'}: listing files"]


def test_a_label_file_over_the_cap_is_refused_unread(tmp_path):
    root = make_dataset(tmp_path, "meta_list")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:  # sparse: 65 MB on paper, nothing on disk
        f.truncate(label_files.MAX_LABEL_FILE_BYTES + 2**20)
    with pytest.raises(DatasetError, match=f"^{big}: larger than 64 MB, too large for a label file$"):
        index_of(root / "val", labels=big)


def test_explicit_label_files_of_each_kind_and_the_cli(tmp_path, capsys):
    root = make_dataset(tmp_path, "devkit")
    devkit = root / "ILSVRC2012_devkit_t12"
    expected = [expected_label(s) for s in VAL_SYNSETS]
    for named in (devkit, devkit / "data" / "meta.mat", devkit / "data" / "ILSVRC2012_validation_ground_truth.txt"):
        assert index_of(root / "val", labels=named, cache=False).labels == expected
    with pytest.raises(DatasetError, match=f"label file not found: {tmp_path / 'nope.csv'}"):
        index_of(root / "val", labels=tmp_path / "nope.csv")
    assert data.main(["index", str(root / "val"), "--workers", "1", "--labels", str(devkit)]) == 0
    assert f"labels   {devkit / 'data' / 'ILSVRC2012_validation_ground_truth.txt'}" in capsys.readouterr().out


# ------------------------------------------------------------------------------ the commands on such a dataset


def test_shards_pack_a_flat_val_with_its_synsets_classes(tmp_path, capsys):
    root = make_dataset(tmp_path / "in", "kaggle")
    out = tmp_path / "shards"
    assert data.main(["shards", str(root), str(out), "--shard-size", "5KB", "--workers", "1"]) == 0
    manifest = json.loads((out / "val" / MANIFEST).read_text())
    train_classes = json.loads((out / "train" / MANIFEST).read_text())["classes"]
    assert manifest["classes"] == sorted(SYNSETS.values()) == train_classes
    digest = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    expected = {digest((root / "val" / f"{val_name(i)}.JPEG").read_bytes()): expected_label(s)
                for i, s in enumerate(VAL_SYNSETS)}
    import tarfile

    got = {}
    for tar_path in sorted((out / "val").glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            parts = {}
            for m in tar.getmembers():
                parts.setdefault(m.name.partition(".")[0], {})[m.name.partition(".")[2]] = tar.extractfile(m).read()
            got.update({digest(p["jpg"]): int(p["cls"]) for p in parts.values()})
    assert got == expected


@pytest.mark.slow
def test_linear_eval_runs_on_a_flat_val(tmp_path):
    """train/ and a flat val/ labelled by the devkit: both splits opened, their classes agree, every
    val image scored (which labels they get: the tests above, through the same index)."""
    root = make_dataset(tmp_path / "in", "devkit")
    out = tmp_path / "lin"
    assert linear_eval.main(["--data", str(root), "--init=random", "--backbone=resnet18", f"--out_dir={out}",
                             "--features=cached", "--epochs=1", "--batch_size=3", "--data.image_size=32",
                             "--data.resize=36", "--reader.num_threads=1", "--reader.loader=torchvision",
                             "--device=cpu"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["final"]["val_images"] == len(VAL_SYNSETS) and doc["train_images"] == 6 and doc["num_classes"] == 3
    assert torch.load(out / "last.pt", weights_only=True)["classes"] == sorted(SYNSETS.values())
    assert json.loads((root / "val" / ".byol_index.json").read_text())["labels_from"]["kind"] == "devkit"


def test_the_knn_monitor_queries_a_flat_val(tmp_path):
    """The kNN monitor opens the val/ beside data.path the way every command does (checked_dataset)."""
    root = make_dataset(tmp_path, "meta_list")
    cfg = load_config(overrides=[f"--data.path={root / 'train'}", "--monitor.knn_every=1", "--monitor.knn_k=3",
                                 "--data.image_size=32", "--reader.num_threads=1", "--reader.loader=torchvision"])
    bank = checked_dataset(root / "train", DistInfo())
    monitor = knn_monitor(cfg, bank, DistInfo(), torch.device("cpu"), 3)
    torch.manual_seed(0)
    result = monitor.run(BYOL(SMALL).online.encoder.eval(), torch.device("cpu"))
    assert 0 <= result["knn/top1"] <= 100
    query = checked_dataset(root / "val", DistInfo())
    assert query.classes == bank.classes and query.labels == [expected_label(s) for s in VAL_SYNSETS]
