"""Every file a user points a command at ends in one line ``error: ...`` naming it, and exit status 2:
files that are no checkpoint at all (text, a .npy, a torn zip, an empty file, a zip of compressed
records) and our own checkpoints with a field of the wrong type or shape (byol_fast.weights.checkpoint_schema),
through each entry point that reads them: train's resume from ``last.pt``, ``--checkpoint`` of
linear_eval, export and predict, and convert."""
import collections
import copy
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY_RUN, write_noise_jpegs

from byol_fast import convert, export, linear_eval, predict, train
from byol_fast.config import LinearConfig, to_dict
from byol_fast.evaluation.classifier import make_head
from byol_fast.weights import checkpoint as ckpt

# The demo's tiny_resnet: each derived file is written in milliseconds.
RESUME = TINY_RUN + ["--model.backbone=tiny_resnet", "--optim.batch_size=8", "--max_steps=1"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """One tiny run's images, its pretraining checkpoint (mid-epoch: a DALI loader state in it), a
    linear-evaluation checkpoint of its encoder and an exported encoder, each read back as a dict."""
    root = tmp_path_factory.mktemp("made")
    images = write_noise_jpegs(root / "imgs", 16)
    assert train.main(RESUME + [f"--data.path={images}", f"--out_dir={root / 'run'}"]) == 0
    pretrain = ckpt.load(root / "run" / ckpt.LAST, ckpt.PRETRAIN)
    assert isinstance(pretrain["loader"][0]["pipeline"], bytes)
    encoder = collections.OrderedDict((k[len("encoder."):], v) for k, v in pretrain["online"].items()
                                      if k.startswith("encoder."))
    head = make_head(128, 2, False)  # tiny_resnet's width
    sgd = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    linear = {"kind": ckpt.LINEAR, "encoder": encoder, "backbone": "tiny_resnet", "padding": "torchvision",
              "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "classes": ["c0", "c1"],
              "head": head.state_dict(), "optimizer": sgd.state_dict(), "epoch": 1, "results": [{"top1": 50.0}],
              "source": {"checkpoint": "x"}, "config": to_dict(LinearConfig()), "rng": ckpt.rng_state(),
              "git": "unknown"}
    exported = collections.OrderedDict(encoder)
    exported._metadata = {"": {"kind": ckpt.ENCODER, "mean": [0.5] * 3, "std": [0.25] * 3, "padding": "torchvision"}}
    return {"images": images, "pretrain": pretrain, "linear": linear, "encoder": exported}


# ---------------------------------------------------------------------------- the inputs


def deflated(src, dst) -> None:
    """``src`` (a torch zip) with every record compressed: what torch.save never writes."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as new:
        for info in old.infolist():
            new.writestr(info.filename, old.read(info.filename))


def _set(path: str, value):
    """A change of the dict at the dotted ``path`` (``config.model.backbone``, ``loader.0.pipeline``)."""
    def change(state: dict) -> None:
        *parents, last = path.split(".")
        for part in parents:
            state = state[int(part)] if isinstance(state, list) else state[part]
        state[int(last) if isinstance(state, list) else last] = value
    return change


def _int_keys(name: str):
    def change(state: dict) -> None:
        state[name] = collections.OrderedDict((i, v) for i, v in enumerate(state[name].values()))
    return change


# (name, the file it starts from, its change, what the message names besides the file)
FIELDS = [
    ("config-not-a-mapping", "pretrain", _set("config", ["resnet18"]), "config: expected a mapping"),
    ("unknown-backbone", "pretrain", _set("config.model.backbone", "resnet9000"), "config.model.backbone"),
    ("mean-of-five", "pretrain", _set("config.data.mean", [0.5] * 5), "config.data.mean"),
    ("mean-not-numbers", "pretrain", _set("config.data.mean", ["r", "g", "b"]), "config.data.mean"),
    ("int-keys", "pretrain", _int_keys("online"), "online: expected a state_dict"),
    ("step-text", "pretrain", _set("step", "abc"), "step: expected a non-negative int, got 'abc'"),
    ("step-negative", "pretrain", _set("step", -3), "step: expected a non-negative int"),
    ("rng-python", "pretrain", _set("rng.python", (3, (1, 2), None)), "rng.python[1]"),
    ("rng-numpy-keys", "pretrain", _set("rng.numpy", ("MT19937", torch.zeros(5), 0, 0, 0.0)), "rng.numpy[1]"),
    ("rng-torch", "pretrain", _set("rng.torch", torch.zeros(3)), "rng.torch"),
    ("loader-text", "pretrain", _set("loader.0.pipeline", "not hex at all"), "loader[0].pipeline"),
    ("loader-step", "pretrain", _set("loader.0.step", 1.5), "loader[0].step"),
    ("kind-not-text", "pretrain", _set("kind", 5), "kind: expected a string"),
    ("optimizer-lr", "pretrain", _set("optimizer.param_groups.0.lr", "fast"), "optimizer.param_groups[0].lr"),
    ("linear-padding", "linear", _set("padding", "valid"), "padding"),
    ("linear-mean", "linear", _set("mean", [1, 2, 3, 4, 5]), "mean: expected three numbers"),
    ("linear-backbone", "linear", _set("backbone", 7), "backbone"),
    ("linear-classes", "linear", _set("classes", "c0,c1"), "classes"),
    ("linear-epoch", "linear", _set("epoch", "1"), "epoch"),
    ("encoder-padding", "encoder", lambda sd: sd._metadata[""].update(padding="bogus"), "tag.padding"),
    ("encoder-std", "encoder", lambda sd: sd._metadata[""].update(std=[0, 0, 0]), "tag.std"),
]
FILES = ["text", "npy", "truncated-zip", "empty", "deflated-zip", "foreign-int-keys"]


def write_input(name: str, made: dict, path):
    """The bad input ``name`` at ``path``; returns what the message must say besides the file (per
    entry point where they word it differently)."""
    if name == "text":
        path.write_text("model:\n  backbone: resnet50\n")
        return "looks like text"
    if name == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
        return ".npy"
    if name == "empty":
        path.write_bytes(b"")
        return "empty"
    if name == "foreign-int-keys":  # of no kind of ours: tensors under numbers instead of names
        torch.save({0: torch.zeros(3), 1: torch.ones(2)}, path)
        return {"export": "got the key 0", "linear_eval": "got the key 0", "convert": "top-level keys: 0, 1",
                "train": "is not a byol_fast.pretrain", "predict": "is not a byol_fast.linear_eval"}
    torch.save(made["pretrain"], path.with_suffix(".tmp"))
    if name == "truncated-zip":
        data = path.with_suffix(".tmp").read_bytes()
        path.write_bytes(data[:len(data) // 2])
        return "zip archive cut short"
    if name == "deflated-zip":
        deflated(path.with_suffix(".tmp"), path)
        return "is compressed (deflate)"
    _, start, change, said = next(field for field in FIELDS if field[0] == name)
    state = copy.deepcopy(made[start])
    change(state)
    torch.save(state, path)
    return said


# ---------------------------------------------------------------------------- the entry points


def run_train(made, path, tmp_path):
    """Resume: the file planted as last.pt in the run's folder."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    planted = out / ckpt.LAST
    path.rename(planted)
    return train.main(RESUME + [f"--data.path={made['images']}", f"--out_dir={out}"]), planted


def run_linear_eval(made, path, tmp_path):
    return linear_eval.main(["--checkpoint", str(path), "--data", str(made["images"]),
                             f"--out_dir={tmp_path / 'lin'}"]), path


def run_export(made, path, tmp_path):
    return export.main(["--checkpoint", str(path), "--out", str(tmp_path / "out.pt")]), path


def run_convert(made, path, tmp_path):
    return convert.main([str(path), "--out", str(tmp_path / "out.pt")]), path


def run_predict(made, path, tmp_path):
    image = next(made["images"].rglob("*.jpg"))
    return predict.main(["--checkpoint", str(path), str(image), "--device", "cpu"]), path


ENTRY_POINTS = {"train": run_train, "linear_eval": run_linear_eval, "export": run_export, "convert": run_convert,
                "predict": run_predict}
# Which inputs each entry point gets: predict reads linear-evaluation checkpoints only, train its own
# pretraining checkpoint only (the other kinds are refused as of another kind before their fields).
ACCEPTS = {"train": ("pretrain",), "predict": ("linear",), "linear_eval": ("pretrain", "linear", "encoder"),
           "export": ("pretrain", "linear", "encoder"), "convert": ("pretrain", "linear", "encoder")}
CASES = [(entry, name) for entry in ENTRY_POINTS for name in FILES] + [
    (entry, name) for entry in ENTRY_POINTS for name, start, _, _ in FIELDS if start in ACCEPTS[entry]]


def one_error_line(capsys, path) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert str(path) in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("entry,name", CASES, ids=[f"{e}-{n}" for e, n in CASES])
def test_a_bad_input_is_one_line_naming_the_file(made, tmp_path, capsys, entry, name):
    path = tmp_path / "bad.pt"
    said = write_input(name, made, path)
    capsys.readouterr()
    status, shown = ENTRY_POINTS[entry](made, path, tmp_path)
    line = one_error_line(capsys, shown)
    assert status == 2 and (said[entry] if isinstance(said, dict) else said) in line, line


@pytest.mark.parametrize("entry,start", [("train", "pretrain"), ("export", "pretrain"), ("export", "linear"),
                                         ("export", "encoder"), ("predict", "linear")])
def test_the_files_the_bad_ones_derive_from_are_read(made, tmp_path, capsys, entry, start):
    """The unchanged files pass: each failure above is its change's."""
    path = tmp_path / "good.pt"
    torch.save(made[start], path)
    status, _ = ENTRY_POINTS[entry](made, path, tmp_path)
    assert status == 0, capsys.readouterr().err[-3000:]


def test_a_compressed_record_is_refused_before_it_is_read(made, tmp_path, monkeypatch):
    """Refused by the record's compression, named, before torch's reader inflates anything."""
    torch.save(made["pretrain"], tmp_path / "plain.pt")
    deflated(tmp_path / "plain.pt", tmp_path / "bomb.pt")
    monkeypatch.setattr(torch.serialization, "_load", lambda *a, **k: pytest.fail("the record was read"))
    with pytest.raises(ckpt.CheckpointError, match=r"bomb\.pt: refused: its record '[^']+' is compressed"):
        ckpt.load(tmp_path / "bomb.pt")


@pytest.mark.parametrize("change,said", [
    (_set("head", make_head(128, 3, False).state_dict()), "its classifier head does not fit a 128-wide encoder"),
    (_set("config", {"data": {"image_size": 0}}), "its config: data.image_size"),
])
def test_predict_names_the_file_when_its_head_or_config_do_not_fit(made, tmp_path, capsys, change, said):
    """Fields predict alone uses (the head, the evaluation's config): a classifier for 3 classes in a
    checkpoint that lists 2, a config out of range."""
    state = copy.deepcopy(made["linear"])
    change(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    status, shown = run_predict(made, path, tmp_path)
    line = one_error_line(capsys, shown)
    assert status == 2 and said in line, line
