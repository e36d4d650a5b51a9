"""Images damaged inside the data (right sizes, so every check made when the data is opened passes)
stop training with one line naming where they are and exit status 2, never a crash.

DALI's image decoder crashes (SIGSEGV, in some runs only) when a batch larger than about 32 holds a
file whose header does not parse (benchmarks/RESULTS.md); ``pipelines.decode.headers_parsed`` parses
every header first. So the batches here are 64 images and every run is repeated with other seeds:
without the guard most of these runs would end in a segfault.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHILD_ENV, READER, ROOT, TINY_RUN, pack_folder, write_noise_jpegs

from byol_fast.config import DataConfig
from byol_fast.datasets.index import build_index
from byol_fast.datasets.shard_set import open_shard_set
from byol_fast.errors import ReadError
from pipelines.contract import Shard
from pipelines.loader import DaliTwoViewLoader

BATCH = 64


def _garbage(kind: str, size: int, rng) -> bytes:
    """``size`` bytes that are no image DALI can parse: random, or a PNG signature before random bytes."""
    noise = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    return noise if kind == "random" else (b"\x89PNG\r\n\x1a\n" + noise)[:size]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_jpegs(tmp_path_factory.mktemp("src") / "train", 2 * BATCH, seed=3)


@pytest.fixture(scope="module", params=["random", "png"])
def damaged_shards(request, images, tmp_path_factory):
    """The images packed into tars of about 64 KB, every image but each tar's first and last
    overwritten in place by other bytes of the same size."""
    out = pack_folder(images, tmp_path_factory.mktemp("packed") / "train", 65536)
    s = open_shard_set(str(out))
    rng = np.random.default_rng(0)
    tar_of = s.samples.tar_of.tolist()
    for i in range(len(tar_of)):
        if 0 < i < len(tar_of) - 1 and tar_of[i - 1] == tar_of[i] == tar_of[i + 1]:
            with open(s.samples.tars[tar_of[i]], "r+b") as f:
                f.seek(int(s.samples.offset[i]))
                f.write(_garbage(request.param, int(s.samples.size[i]), rng))
    open_shard_set(str(out))  # the checks made at open time pass: sizes, headers, first and last images
    return out


@pytest.fixture(scope="module")
def damaged_index(images, tmp_path_factory):
    """An index JSON of a copy of the images in which a third of the files listed are no longer images
    (same size, same mtime: the index still trusts its verdicts)."""
    root = tmp_path_factory.mktemp("copy") / "train"
    for path in sorted(images.rglob("*.jpg")):
        (root / path.parent.name).mkdir(parents=True, exist_ok=True)
        (root / path.parent.name / path.name).write_bytes(path.read_bytes())
    index = build_index(root, workers=1, cache=True, progress=False)
    rng = np.random.default_rng(1)
    for path in index.files[1::3]:
        st = os.stat(path)
        with open(path, "r+b") as f:
            f.write(_garbage("random", st.st_size, rng))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert json.loads((root / ".byol_index.json").read_text())  # what --data.path is given
    return root / ".byol_index.json"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_loader_over_damaged_shards_raises_one_line_naming_the_shard(damaged_shards, seed):
    s = open_shard_set(str(damaged_shards))
    loader = DaliTwoViewLoader(s.samples, DataConfig(image_size=32), READER, BATCH, "cpu", Shard(), seed,
                               torch.device("cpu"))
    with pytest.raises(ReadError) as e:
        for _ in loader:
            pass
    message = str(e.value)
    assert "\n" not in message and message.startswith(str(damaged_shards / "shard-0"))
    assert "an image could not be decoded" in message and "(member " in message


def _train(data_path, out, seed) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, f"--optim.batch_size={BATCH}", "--epochs=1",
           f"--seed={seed}", "--reader.decode=cpu", f"--data.path={data_path}", f"--out_dir={out}"]
    return subprocess.run(cmd, env=CHILD_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_on_damaged_shards_exits_2_with_one_line_naming_the_shard(damaged_shards, tmp_path, seed):
    res = _train(damaged_shards, tmp_path / "run", seed)
    assert res.returncode == 2, f"exit {res.returncode}: {res.stderr[-2000:]}"  # -11: the decoder's segfault
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {damaged_shards / 'shard-0'}") and "an image could not be decoded" in last, last
    assert "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_training_on_an_index_listing_non_images_exits_2_with_one_line_naming_a_file(damaged_index, tmp_path,
                                                                                    seed):
    res = _train(damaged_index, tmp_path / "run", seed)
    assert res.returncode == 2, f"exit {res.returncode}: {res.stderr[-2000:]}"
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {damaged_index.parent}") and "an image could not be decoded" in last, last
    assert "Traceback" not in res.stderr
