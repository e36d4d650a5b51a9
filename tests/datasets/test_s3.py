"""Shard sets on object storage, against a real S3-compatible server (moto's, from PyPI) that this
module starts on 127.0.0.1 in its own process and stops at the end.

The endpoint and credentials reach byol_fast (boto3) and DALI (the AWS C++ SDK) only through the
standard AWS variables; the tests isolate them from this machine's ~/.aws files and from the
instance-metadata lookup, which would leave the loopback address."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import CHILD_ENV, READER, ROOT, TINY_RUN, pack_folder, write_noise_jpegs

from byol_fast import data
from byol_fast.datasets import object_store as store
from byol_fast.config import LinearDataConfig
from byol_fast.errors import DatasetError
from byol_fast.datasets.shard_set import open_shard_set
from pipelines.contract import Shard
from pipelines.loader import DaliEvalLoader

SECRET = "s3cr3t-that-must-never-be-printed"
BUCKET = "byol-bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aws_env(tmp, endpoint: str, credentials: bool = True) -> dict:
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(tmp / "no-config"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-credentials"),
           "AWS_EC2_METADATA_DISABLED": "true"}
    if credentials:
        env.update(AWS_ACCESS_KEY_ID="byol-test-key", AWS_SECRET_ACCESS_KEY=SECRET)
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 (its own process: DALI's reads hold the GIL), stopped afterwards."""
    port = free_port()
    moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=10)


@pytest.fixture
def aws(server, tmp_path, monkeypatch):
    """This process's AWS variables pointed at the server (boto3's client rebuilt for them)."""
    def use(endpoint=server, credentials=True):
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        for k, v in aws_env(tmp_path, endpoint, credentials).items():
            monkeypatch.setenv(k, v)
        store._client.cache_clear()

    use()
    yield use
    store._client.cache_clear()


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """16 noise JPEGs in two classes, packed 3-4 per tar."""
    root = write_noise_jpegs(tmp_path_factory.mktemp("src") / "train", 16, seed=5)
    return pack_folder(root, tmp_path_factory.mktemp("packed") / "train", 20480)


@pytest.fixture(scope="module")
def uploaded(server, local, tmp_path_factory):
    """The local shard set under s3://BUCKET/imagenet/train."""
    import boto3

    tmp = tmp_path_factory.mktemp("aws")
    env = aws_env(tmp, server)
    client = boto3.session.Session(aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=SECRET, region_name="us-east-1").client(
        "s3", endpoint_url=server)
    client.create_bucket(Bucket=BUCKET)
    for f in sorted(local.iterdir()):
        client.upload_file(str(f), BUCKET, f"imagenet/train/{f.name}")
    return f"s3://{BUCKET}/imagenet/train"


def test_an_s3_shard_set_reads_the_same_samples_and_pixels_as_the_local_copy(aws, local, uploaded):
    remote, here = open_shard_set(uploaded), open_shard_set(str(local))
    assert remote.labels == here.labels and remote.classes == here.classes
    assert remote.samples.tars[0] == uploaded + "/shard-000000.tar"
    assert all((getattr(remote.samples, k) == getattr(here.samples, k)).all()
               for k in ("tar_of", "key", "ext", "offset", "size"))
    crops = LinearDataConfig(image_size=32, resize=32)
    batches = [list(DaliEvalLoader(s.samples, s.labels, False, crops, READER, 4, "cpu", Shard(), 0,
                                   torch.device("cpu"))) for s in (remote, here)]
    assert len(batches[0]) == 4
    assert all(torch.equal(x, y) for a, b in zip(*batches) for x, y in zip(a, b))


def run_train(data_path, out, env):
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, "--optim.batch_size=4", "--epochs=1",
           "--reader.num_threads=1", f"--data.path={data_path}", f"--out_dir={out}"]
    res = subprocess.run(cmd, env={**CHILD_ENV, **env}, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert SECRET not in res.stdout + res.stderr
    state = torch.load(out / "last.pt", weights_only=True)
    return {f"{p}.{k}": v for p in ("online", "target") for k, v in state[p].items()}


@pytest.mark.slow
def test_pretraining_from_s3_ends_bit_identical_to_pretraining_from_the_local_shards(local, uploaded, server,
                                                                                     tmp_path):
    env = aws_env(tmp_path, server)
    from_s3, from_disk = run_train(uploaded, tmp_path / "s3", env), run_train(local, tmp_path / "disk", env)
    assert from_s3.keys() == from_disk.keys()
    assert all(torch.equal(from_s3[k], from_disk[k]) for k in from_s3)


def test_verify_reads_an_s3_shard_set(aws, uploaded, capsys):
    assert data.main(["verify", uploaded]) == 0
    assert "16 samples match the manifest" in capsys.readouterr().out


def one_line_refusal(url, *words, seconds=25) -> str:
    start = time.monotonic()
    with pytest.raises(DatasetError) as e:
        open_shard_set(url)
    message = str(e.value)
    assert time.monotonic() - start < seconds  # a time-out, never a hang
    assert "\n" not in message and all(w in message for w in words), message
    assert SECRET not in message
    return message


def test_an_unreachable_endpoint_is_one_line_naming_it(aws, uploaded):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    aws(endpoint=dead)
    one_line_refusal(uploaded, uploaded, dead, "does not answer", "AWS_ENDPOINT_URL")


def test_a_missing_bucket_is_one_line_naming_it(aws, uploaded):
    one_line_refusal("s3://no-such-bucket/imagenet/train", "s3://no-such-bucket/imagenet/train/manifest.json",
                     "no bucket 'no-such-bucket'")


def test_missing_credentials_are_one_line_naming_the_variables(aws, uploaded):
    aws(credentials=False)
    one_line_refusal(uploaded, uploaded, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def test_a_prefix_without_a_shard_set_is_one_line(aws, uploaded):
    one_line_refusal(f"s3://{BUCKET}/imagenet/val", "manifest.json", "not a shard set")


def test_the_cli_reports_an_s3_mistake_in_one_line(server, uploaded, tmp_path):
    cmd = [sys.executable, "-m", "byol_fast.train", *TINY_RUN, "--data.path=s3://no-such-bucket/x",
           f"--out_dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, env={**CHILD_ENV, **aws_env(tmp_path, server)}, cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: s3://no-such-bucket/x/manifest.json: no bucket")
    assert SECRET not in res.stdout + res.stderr


def test_an_endpoint_that_accepts_but_never_answers_times_out(aws, uploaded, monkeypatch):
    """A black hole: connections are accepted, nothing is ever sent back. The read time-out (made
    1 s here; 20 s by default) ends it, one line."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        monkeypatch.setattr(store, "READ_TIMEOUT_S", 1)
        aws(endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}")
        one_line_refusal(uploaded, uploaded, "does not answer", seconds=15)
