"""Reading a shard set: every kind of bad input stops before training with one line naming the file,
``verify`` finds what only every byte shows, and what the DALI loaders read from shards equals what
they read from the image folder (the kNN monitor's accuracy, which does not depend on reading order,
and linear evaluation on a linearly separable set)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CHILD_ENV, ROOT, SMALL, TINY_RUN, pack_folder, write_noise_jpegs
from PIL import Image

from byol_fast import data, linear_eval
from byol_fast.config import Config, load_config, to_dict
from byol_fast.runtime.dist import DistInfo
from byol_fast.errors import DatasetError
from byol_fast.datasets.index import build_index
from byol_fast.models.byol import BYOL
from byol_fast.datasets.shard_set import open_shard_set
from byol_fast.datasets.shard_pack import MANIFEST, pack
from byol_fast.train import knn_monitor


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """18 noise JPEGs in two classes, packed 4 to a tar (5 shards)."""
    root = write_noise_jpegs(tmp_path_factory.mktemp("src") / "train", 18, seed=7)
    return pack_folder(root, tmp_path_factory.mktemp("packed") / "train", 20480)


@pytest.fixture
def shards(clean, tmp_path):
    """A fresh copy of the clean shard set, to damage."""
    return shutil.copytree(clean, tmp_path / "train")


def refused(path, *words) -> str:
    with pytest.raises(DatasetError) as e:
        open_shard_set(str(path))
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    return message


def test_a_clean_set_opens_with_every_sample_and_label(clean):
    s = open_shard_set(str(clean))
    manifest = json.loads((clean / MANIFEST).read_text())
    assert len(s) == 18 == manifest["num_samples"] and s.classes == ["c0", "c1"]
    assert sorted(s.labels) == [0] * 9 + [1] * 9
    assert len(manifest["shards"]) >= 4 and len(set(s.samples.tar_of.tolist())) == len(manifest["shards"])


def test_a_truncated_tar_is_refused_naming_it(shards):
    tar = shards / "shard-000001.tar"
    os.truncate(tar, tar.stat().st_size - 700)
    refused(shards, "shard-000001.tar", "truncated")


def test_a_damaged_tar_header_is_refused_naming_it(shards):
    tar = shards / "shard-000002.tar"
    with open(tar, "r+b") as f:
        f.write(b"\xff" * 300)  # the first member's header, same size
    refused(shards, "shard-000002.tar", "damaged")


def test_a_missing_index_file_is_refused_naming_it(shards):
    (shards / "shard-000000.idx").unlink()
    refused(shards, "shard-000000.idx", "missing")


def test_a_stale_index_file_is_refused_naming_it(shards, tmp_path):
    src = build_index(_source_of(shards), workers=1, cache=False, progress=False)
    other = tmp_path / "other"
    pack(src, other, shard_bytes=20480, seed=99, progress=False)  # another order: other offsets, names
    shutil.copy(other / "shard-000001.idx", shards / "shard-000001.idx")
    refused(shards, "shard-000001.idx")


def _source_of(shards):
    return json.loads((shards / MANIFEST).read_text())["source"]["root"]


def test_a_sample_without_its_label_is_refused_naming_it(shards):
    idx = shards / "shard-000003.idx"
    lines = idx.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:4])  # the first sample's image only, no .cls member
    idx.write_text("\n".join(lines) + "\n")
    message = refused(shards, "shard-000003.idx", "no .cls label")
    assert lines[1].split()[3].split(".")[0] in message  # names the sample's key


def test_a_tar_replaced_by_another_of_the_same_layout_is_refused(shards, tmp_path):
    """Same size, same headers, same index: only the images differ. The first and last images'
    digest in the manifest tells them apart before training."""
    s = open_shard_set(str(shards))
    tar = shards / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    first = int(s.samples.offset[list(s.samples.tar_of).index(1)])
    data[first + 100] ^= 0xFF  # one byte of the first image
    tar.write_bytes(bytes(data))
    refused(shards, "shard-000001.tar", "replaced or damaged")


@pytest.mark.parametrize("mistake, words", [
    (lambda m: m.update(shards=[1, 2]), ("shards[0]", "expected")),
    (lambda m: m["shards"][0].update(bytes="10240"), ("shards[0]", "bytes: int")),
    (lambda m: m["shards"][1].update(labels=None), ("shards[1]", "labels: list")),
    (lambda m: m["shards"][1].update(labels=[0.5] * m["shards"][1]["samples"]), ("labels must be whole numbers",)),
    (lambda m: m.update(classes="abc"), ("classes",)),
    (lambda m: m["shards"].append(dict(m["shards"][0])), ("shard-000000.tar is listed twice",)),
])
def test_a_manifest_with_wrong_types_is_one_line(shards, mistake, words):
    manifest = json.loads((shards / MANIFEST).read_text())
    mistake(manifest)
    (shards / MANIFEST).write_text(json.dumps(manifest))
    refused(shards, MANIFEST, *words)


def test_a_tar_gone_after_the_checks_stops_the_epoch_with_one_line(shards):
    """The reader opens its tars when an epoch's pipeline is built: a tar removed by then (or an
    object storage that stopped answering) is one line naming it, not DALI's trace."""
    from byol_fast.config import DataConfig
    from byol_fast.errors import ReadError
    from pipelines.contract import Shard
    from pipelines.loader import DaliTwoViewLoader
    from conftest import READER

    s = open_shard_set(str(shards))
    (shards / "shard-000003.tar").unlink()
    loader = DaliTwoViewLoader(s.samples, DataConfig(image_size=32), READER, 4, "cpu", Shard(), 0, torch.device("cpu"))
    with pytest.raises(ReadError) as e:
        next(iter(loader))
    assert str(e.value).startswith(str(shards / "shard-000003.tar")) and "could not be read" in str(e.value)


def test_an_image_folder_with_a_manifest_of_its_own_is_still_a_folder(tmp_path):
    from byol_fast.datasets.shard_set import is_shard_set

    root = write_noise_jpegs(tmp_path / "imgs", 4)
    (root / "manifest.json").write_text('{"name": "some dataset", "version": 3}')
    assert not is_shard_set(root)
    assert len(_dataset(root)) == 4  # indexed as images


@pytest.mark.parametrize("mistake", ["unlisted tar", "listed tar missing", "count", "no manifest"])
def test_a_manifest_that_does_not_match_the_files_is_refused(shards, mistake):
    manifest = json.loads((shards / MANIFEST).read_text())
    if mistake == "unlisted tar":
        shutil.copy(shards / "shard-000000.tar", shards / "shard-000077.tar")
        refused(shards, "shard-000077.tar", "not in manifest.json")
    elif mistake == "listed tar missing":
        (shards / "shard-000002.tar").unlink()
        refused(shards, "shard-000002.tar", "missing")
    elif mistake == "count":
        manifest["num_samples"] += 1
        (shards / MANIFEST).write_text(json.dumps(manifest))
        refused(shards, MANIFEST, "num_samples")
    else:
        (shards / MANIFEST).unlink()
        refused(shards, MANIFEST, "not a shard set")


def test_verify_finds_a_damaged_image_that_only_every_byte_shows(shards, capsys):
    assert data.main(["verify", str(shards)]) == 0
    assert "18 samples match the manifest" in capsys.readouterr().out
    s = open_shard_set(str(shards))
    t = s.samples.tar_of.tolist()
    i = next(i for i in range(1, len(t) - 1) if t[i - 1] == t[i] == t[i + 1])  # neither first nor last in its tar
    tar = s.samples.tars[s.samples.tar_of[i]]
    with open(tar, "r+b") as f:
        f.seek(int(s.samples.offset[i]) + 20)
        f.write(b"\x00" * 64)
    open_shard_set(str(shards))  # the cheap checks pass: same size, headers, first and last images intact
    assert data.main(["verify", str(shards)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after a progress line per whole shard
    assert err.startswith("error: ") and os.path.basename(tar) in err and "damaged" in err


@pytest.mark.slow
def test_training_on_a_damaged_image_stops_with_one_line_naming_the_shard(shards, tmp_path):
    s = open_shard_set(str(shards))
    t = s.samples.tar_of.tolist()
    middle = [i for i in range(1, len(t) - 1) if t[i - 1] == t[i] == t[i + 1]]
    assert len(middle) >= 5
    for i in middle:  # every image the cheap checks do not read damaged: whichever batch comes first fails
        with open(s.samples.tars[s.samples.tar_of[i]], "r+b") as f:
            f.seek(int(s.samples.offset[i]))
            f.write(b"\x00" * 200)
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, "--optim.batch_size=4", "--epochs=1",
           f"--data.path={shards}", f"--out_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "shard-0000" in last and "an image could not be decoded" in last
    assert "Traceback" not in res.stderr


def test_a_damaged_shard_set_stops_the_run_before_training(shards, tmp_path):
    os.truncate(shards / "shard-000000.tar", 1000)
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, "--optim.batch_size=4", "--epochs=1",
           f"--data.path={shards}", f"--out_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: {shards / 'shard-000000.tar'}: 1000 bytes")
    assert "step 1" not in res.stdout


# ---------------------------------------------------------------------------- same images, same results


@pytest.fixture(scope="module")
def separable(tmp_path_factory):
    """An ImageFolder root with train/ (12 per class) and val/ (6 per class), dark vs bright noisy
    images (linearly separable), and the same root packed into shards (OUT/train, OUT/val)."""
    root = tmp_path_factory.mktemp("sep")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 6)):
        for label, base in ((0, 40), (1, 200)):
            folder = root / "images" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (base + 30 * torch.randn(40, 48, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=90)
    assert data.main(["shards", str(root / "images"), str(root / "shards"), "--shard-size", "20KiB",
                      "--workers", "1"]) == 0
    return root / "images", root / "shards"


def test_the_knn_monitor_gives_the_same_accuracy_from_shards_as_from_the_folder(separable):
    images, shards = separable
    torch.manual_seed(0)
    encoder = BYOL(SMALL).online.encoder.eval()
    results = []
    for root in (images, shards):
        cfg = load_config(overrides=[f"--data.path={root / 'train'}", "--monitor.knn_every=1", "--monitor.knn_k=5",
                                     "--data.image_size=32", "--reader.num_threads=1"])
        monitor = knn_monitor(cfg, _dataset(root / "train"), DistInfo(), torch.device("cpu"), 5)
        results.append(monitor.run(encoder, torch.device("cpu")))
    assert results[0] == results[1]  # the same bank and queries, read in another order
    assert 0 <= results[0]["knn/top1"] <= 100


def _dataset(path):
    from byol_fast.datasets.open_dataset import checked_dataset

    return checked_dataset(path, DistInfo())


def test_linear_evaluation_reads_shards_and_separates_the_classes(separable, tmp_path):
    torch.manual_seed(123)
    model = BYOL(SMALL)
    ckpt = tmp_path / "last.pt"
    torch.save({"online": model.online.state_dict(), "target": model.target.state_dict(),
                "predictor": model.predictor.state_dict(), "config": to_dict(Config(model=SMALL)), "step": 1}, ckpt)
    out = tmp_path / "lin"
    args = ["--checkpoint", ckpt, "--data", separable[1], "--features=cached", f"--out_dir={out}", "--epochs=4",
            "--head_bn=true", "--data.image_size=32", "--data.resize=36", "--reader.num_threads=1",
            "--batch_size=8", "--log_every=1", "--device=cpu"]
    assert linear_eval.main(list(map(str, args))) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["train_images"] == 24 and doc["val_images"] == 12
    assert doc["final"]["top1"] == 100.0  # dark vs bright: linearly separable
    # The torchvision loader reads folders only: a shard set with it is one line naming the key.
    assert linear_eval.main(list(map(str, args + ["--reader.loader=torchvision"]))) == 2


@pytest.mark.gpu
def test_the_gpu_decoder_reads_shards_as_it_reads_the_folder(separable):
    """The same graph after the webdataset reader on the GPU (nvJPEG): the validation crops of every
    image from shards equal those from the folder, image by image (matched by label and pixels)."""
    from byol_fast.config import LinearDataConfig, ReaderConfig
    from byol_fast.datasets.loaders import eval_loader

    crops, reader = LinearDataConfig(image_size=32, resize=36), ReaderConfig(num_threads=2, decode="gpu")
    seen = []
    for root in separable:
        loader = eval_loader(_dataset(root / "val"), False, crops, reader, 4, DistInfo(), torch.device("cuda"))
        images, labels = zip(*[(x.cpu(), y.cpu()) for x, y in loader])
        images, labels = torch.cat(images), torch.cat(labels)
        key = images.flatten(1).sum(1).argsort()  # the same images in another order: sort by content
        seen.append((images[key], labels[key]))
    assert torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[0][0], seen[1][0])


@pytest.mark.slow
def test_two_processes_read_a_shard_set_and_both_report_a_damaged_one(shards, tmp_path):
    """Rank 0 checks the set, the other ranks open it after; a damaged set is the same one line on
    every rank (no rank left waiting for one that stopped)."""
    def run(out):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "byol_fast.train", *TINY_RUN, f"--data.path={shards}", f"--out_dir={out}",
               "--optim.batch_size=8", "--max_steps=2"]
        return subprocess.run(cmd, cwd=ROOT, env=CHILD_ENV, capture_output=True, text=True, timeout=300)

    res = run(tmp_path / "ok")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert torch.load(tmp_path / "ok" / "last.pt", weights_only=True)["step"] == 2
    os.truncate(shards / "shard-000002.tar", 512)
    res = run(tmp_path / "bad")
    line = f"error: {shards / 'shard-000002.tar'}: 512 bytes"
    assert res.returncode != 0 and res.stderr.count(line) == 2, res.stderr[-3000:]


def test_index_files_of_a_killed_process_are_removed_by_the_next_loader(clean):
    import tempfile

    from byol_fast.config import DataConfig
    from conftest import READER
    from pipelines.contract import Shard
    from pipelines.loader import DaliTwoViewLoader

    orphan = os.path.join(tempfile.gettempdir(), "byol_fast-shards-999999999-x")  # no such process
    os.makedirs(orphan, exist_ok=True)
    s = open_shard_set(str(clean))
    loader = DaliTwoViewLoader(s.samples, DataConfig(image_size=32), READER, 4, "cpu", Shard(), 0, torch.device("cpu"))
    next(iter(loader))
    assert not os.path.exists(orphan)
    mine = loader._tmp
    assert os.path.basename(mine).startswith(f"byol_fast-shards-{os.getpid()}-")
    del loader
    import gc

    gc.collect()
    assert not os.path.exists(mine)  # a loader removes its own folder when it goes
