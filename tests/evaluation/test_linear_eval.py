"""Linear evaluation end to end on CPU: tiny images, a small checkpoint, results, resume, strict loading."""
import json
import math
import os

import pytest
import torch
from PIL import Image

from byol_fast import linear_eval
from byol_fast.config import Config, load_config, to_dict
from byol_fast.weights.encoder_file import load_feature_extractor
from byol_fast.models.byol import BYOL
from byol_fast.optim.schedules import scaled_lr
from conftest import ROOT, SMALL, ddp_env

FAST = ["--data.image_size=32", "--data.resize=36", "--reader.num_threads=0", "--reader.loader=torchvision",
        "--batch_size=8", "--log_every=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """train/ (12 per class) and val/ (6 per class): dark noisy images vs bright noisy images."""
    root = tmp_path_factory.mktemp("lin")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 12), ("val", 6)):
        for label, base in ((0, 40), (1, 200)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (base + 30 * torch.randn(40, 48, 3, generator=g)).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def pretrain_ckpt(tmp_path_factory):
    """A training checkpoint in train.py's layout, with online running statistics set by a few forwards."""
    torch.manual_seed(123)  # not linear_eval's seed: its random-init baseline must differ from this encoder
    model = BYOL(SMALL)
    model.online.train()
    with torch.no_grad():
        for _ in range(3):
            model.online(torch.randn(8, 3, 32, 32))
    path = tmp_path_factory.mktemp("run") / "last.pt"
    torch.save({"online": model.online.state_dict(), "target": model.target.state_dict(),
                "predictor": model.predictor.state_dict(), "config": to_dict(Config(model=SMALL)), "step": 3}, path)
    return path


def run(*args):
    return linear_eval.main(list(map(str, args)))


def test_recipes_mirror_the_paper():
    cfg = load_config(ROOT / "config/linear_r50_in1k.yaml", cls=linear_eval.LinearConfig)
    assert (cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.epochs) == (1024, 0.9, 0.0, 90)
    assert scaled_lr(cfg.lr, cfg.batch_size) == pytest.approx(0.8)  # DeepMind: 0.2 x batch / 256
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.crop_area, cfg.data.interp) == (224, 256, (0.08, 1.0), "cubic")
    assert cfg.features == "images" and not cfg.head_bn and cfg.init == "checkpoint"
    demo = load_config(ROOT / "config/linear_demo.yaml", cls=linear_eval.LinearConfig)
    assert demo.data.path == "data/demo"


def test_config_errors_name_the_key(tmp_path, capsys):
    assert run("--data", tmp_path, "--checkpoint", tmp_path / "x.pt", "--lrr=1") == 2
    assert "lrr" in capsys.readouterr().err
    assert run("--data", tmp_path, "--features=fancy", "--checkpoint", "x.pt") == 2
    assert "features" in capsys.readouterr().err
    assert run("--data", tmp_path) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_cached_run_results_resume_and_frozen_encoder(data_root, pretrain_ckpt, tmp_path, capsys):
    out = tmp_path / "lin"
    args = ["--checkpoint", pretrain_ckpt, "--data", data_root, "--features=cached", f"--out_dir={out}", *FAST]
    assert run(*args, "--epochs=4", "--head_bn=true") == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2, 3, 4]
    assert all(r["val_images"] == 12 and 0 <= r["top1"] <= r["top5"] <= 100 for r in doc["epochs"])
    assert doc["final"]["top1"] == 100.0  # dark vs bright: linearly separable
    # Cosine without warm-up, per step: after epoch e of 4, lr = peak * (1 + cos(pi e / 4)) / 2.
    peak = 0.2 * 8 / 256
    for r in doc["epochs"]:
        assert r["lr"] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * r["epoch"] / 4)), abs=1e-9)
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    capsys.readouterr()

    # The frozen encoder in the linear checkpoint is the pretraining online encoder, bit for bit
    # (eval mode: not even the batch-norm running statistics moved).
    online = torch.load(pretrain_ckpt)["online"]
    saved = torch.load(out / "last.pt", weights_only=True)
    assert set(saved["encoder"]) == {k[len("encoder."):] for k in online if k.startswith("encoder.")}
    assert all(torch.equal(saved["encoder"][k], online["encoder." + k]) for k in saved["encoder"])
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(load_feature_extractor(out / "last.pt")(images), load_feature_extractor(pretrain_ckpt)(images))

    assert run(*args, "--epochs=5", "--head_bn=true") == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "after epoch 4" in printed and "epoch 4/5" not in printed
    assert len(json.loads((out / "results.json").read_text())["epochs"]) == 5

    # Another source into the same folder is refused rather than mixed.
    assert run(*args, "--epochs=5", "--head_bn=true", "--init=random") == 2
    assert "another evaluation" in capsys.readouterr().err


@pytest.mark.parametrize("loader", ["torchvision", "dali"])
def test_images_mode(data_root, pretrain_ckpt, tmp_path, loader):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / loader
    assert run("--checkpoint", pretrain_ckpt, "--data", data_root, f"--out_dir={out}", *FAST, "--epochs=1",
               f"--reader.loader={loader}", "--device=cpu") == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["final"]["val_images"] == 12 and doc["train_images"] == 24


def test_random_init_baseline_goes_beside_the_checkpoint(data_root, pretrain_ckpt, capsys):
    assert run("--checkpoint", pretrain_ckpt, "--data", data_root, "--init", "random", "--features=cached",
               *FAST, "--epochs=1") == 0
    out = pretrain_ckpt.parent / "linear_random"
    doc = json.loads((out / "results.json").read_text())
    assert doc["source"]["init"] == "random" and doc["source"]["backbone"] == "resnet18"
    online = torch.load(pretrain_ckpt)["online"]
    saved = torch.load(out / "last.pt", weights_only=True)["encoder"]
    assert not torch.equal(saved["conv1.weight"], online["encoder.conv1.weight"])


@pytest.mark.parametrize("prefix", ["module.", "backbone."])
def test_prefixed_state_dict_is_refused(data_root, pretrain_ckpt, tmp_path, capsys, prefix):
    online = torch.load(pretrain_ckpt)["online"]
    bad = {prefix + k[len("encoder."):]: v for k, v in online.items() if k.startswith("encoder.")}
    torch.save(bad, tmp_path / "bad.pt")
    assert run("--checkpoint", tmp_path / "bad.pt", "--data", data_root, f"--out_dir={tmp_path / 'o'}", *FAST) == 2
    assert f"'{prefix}'" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_count_every_val_image_once(data_root, pretrain_ckpt, tmp_path):
    """torchrun-style environment, gloo on CPU: DDP classifier, sharded loaders, summed counts."""
    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(str(pretrain_ckpt), str(data_root), str(out)), nprocs=2)
    doc = json.loads((out / "results.json").read_text())
    assert doc["final"]["val_images"] == 12 and len(doc["epochs"]) == 1


def _ddp_worker(rank, ckpt, data, out):
    ddp_env(rank, 2, 29400 + os.getppid() % 500)
    code = linear_eval.main(["--checkpoint", ckpt, "--data", data, f"--out_dir={out}", *FAST, "--epochs=1",
                             "--device=cpu", "--features=cached"])
    assert code == 0


@pytest.mark.slow
def test_a_stop_signal_exits_75_and_the_rerun_resumes_after_the_last_whole_epoch(data_root, pretrain_ckpt, tmp_path):
    import signal
    import subprocess
    import sys

    from conftest import CHILD_ENV

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "byol_fast.linear_eval", "--checkpoint", str(pretrain_ckpt), "--data", str(data_root),
           f"--out_dir={out}", *FAST, "--epochs=200", "--device=cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("epoch 2/200"):
            proc.send_signal(signal.SIGUSR1)
            break
    seen += proc.stdout.readlines()
    assert proc.wait(timeout=120) == 75, "".join(seen)[-3000:]
    done = torch.load(out / "last.pt", weights_only=True)["epoch"]
    assert 2 <= done < 200 and len(json.loads((out / "results.json").read_text())["epochs"]) == done
    # The rerun asks for one epoch more than were done (not 200), enough to see it resume and finish.
    res = subprocess.run(cmd[:-2] + ["--epochs=" + str(done + 1), "--device=cpu"], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and f"resumed from {out / 'last.pt'} after epoch {done}" in res.stdout, res.stdout[-2000:]
    assert [r["epoch"] for r in json.loads((out / "results.json").read_text())["epochs"]] == list(range(1, done + 2))


def test_predict_gives_the_heads_softmax_on_the_validation_crops(data_root, pretrain_ckpt, tmp_path, capsys):
    """byol_fast.predict against the same numbers computed here from the checkpoint's tensors with
    torchvision's ResNet-18 and functional transforms (resize shorter side, center crop, normalise)."""
    import torchvision
    import torchvision.transforms.functional as TF

    from byol_fast import predict

    out = tmp_path / "lin"
    assert run("--checkpoint", pretrain_ckpt, "--data", data_root, "--features=cached", f"--out_dir={out}", *FAST,
               "--epochs=3") == 0
    images = sorted((data_root / "val").rglob("*.jpg"))[::3]
    capsys.readouterr()
    assert predict.main(["--checkpoint", str(out / "last.pt"), *map(str, images), "--topk", "2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)

    state = torch.load(out / "last.pt", weights_only=True)
    net = torchvision.models.resnet18()
    net.load_state_dict(state["encoder"], strict=False)
    net.fc = torch.nn.Identity()
    mean, std = torch.tensor(state["mean"]).view(3, 1, 1), torch.tensor(state["std"]).view(3, 1, 1)
    crops = []
    for path in images:
        img = TF.center_crop(TF.resize(Image.open(path).convert("RGB"), 36), 32)
        crops.append((TF.to_tensor(img) - mean) / std)
    with torch.no_grad():
        probs = (net.eval()(torch.stack(crops)) @ state["head"]["0.weight"].T + state["head"]["0.bias"]).softmax(1)
    assert [r["image"] for r in got] == list(map(str, images))
    for r, p in zip(got, probs):
        assert r["pred_class"] == ["class0", "class1"][int(p.argmax())] and r["pred_label"] == int(p.argmax())
        assert r["pred_score"] == pytest.approx(float(p.max()), abs=1e-5)
        assert [t["class"] for t in r["topk"]] == [["class0", "class1"][i] for i in p.argsort(descending=True)]
    (tmp_path / "notes.jpg").write_text("not an image")
    assert predict.main(["--checkpoint", str(out / "last.pt"), str(tmp_path / "notes.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "notes.jpg" in err[0] and "not an image" in err[0]


def test_finetune_trains_the_whole_network_on_a_balanced_fraction_and_resumes(data_root, pretrain_ckpt, tmp_path,
                                                                               capsys):
    from byol_fast import finetune
    from byol_fast.evaluation.classifier import ImageClassifier

    out = tmp_path / "ft"
    args = ["--checkpoint", str(pretrain_ckpt), "--data", str(data_root), f"--out_dir={out}", *FAST,
            "--label_fraction=0.5", "--batch_size=4"]
    assert finetune.main(args + ["--epochs=1"]) == 0
    assert "labelled subset: 12 of 24 training images" in capsys.readouterr().out  # 6 of 12 per class
    assert finetune.main(args + ["--epochs=2"]) == 0
    assert "after epoch 1" in capsys.readouterr().out
    doc = json.loads((out / "results.json").read_text())
    assert [r["epoch"] for r in doc["epochs"]] == [1, 2] and doc["train_images"] == 12 and doc["val_images"] == 12
    state = torch.load(out / "last.pt", weights_only=True)
    before = torch.load(pretrain_ckpt, weights_only=True)["online"]
    moved = [k for k, v in state["encoder"].items() if v.is_floating_point()
             and not torch.equal(v, before["encoder." + k])]
    assert len(moved) > 50  # the encoder itself was trained (linear evaluation leaves it untouched)
    got = ImageClassifier.from_checkpoint(out / "last.pt").predict(sorted((data_root / "val").rglob("*.jpg"))[:2])
    assert len(got) == 2 and got[0]["pred_class"] in ("class0", "class1")


def test_finetune_reads_a_published_subset_list_and_names_what_is_missing(pretrain_ckpt, tmp_path, capsys):
    from byol_fast import finetune
    from conftest import write_noise_jpegs

    root = tmp_path / "data"
    write_noise_jpegs(root / "train", 16)  # c0/0.jpg, c1/1.jpg, c0/2.jpg, ...: every name once
    write_noise_jpegs(root / "val", 4, seed=1)
    listed = tmp_path / "4images.txt"
    listed.write_text("0.jpg\n1.jpg\n2.jpg\n3.jpg\n0.jpg\n")  # a repeated name counts once
    args = ["--checkpoint", str(pretrain_ckpt), "--data", str(root), *FAST, "--batch_size=2", "--epochs=1"]
    assert finetune.main(args + [f"--subset={listed}", f"--out_dir={tmp_path / 'a'}"]) == 0
    assert "labelled subset: 4 of 16 training images" in capsys.readouterr().out
    # A local validation split (the paper's way of choosing lr and epochs): held out of the 12 images
    # outside the list, so the labelled subset stays the same; val/ is not read.
    assert finetune.main(args + [f"--subset={listed}", "--holdout=5", f"--out_dir={tmp_path / 'h'}"]) == 0
    out = capsys.readouterr().out
    assert "labelled subset: 4 of 16 training images" in out and "5 images held out of train/" in out
    doc = json.loads((tmp_path / "h" / "results.json").read_text())
    assert (doc["train_images"], doc["val_images"], doc["source"]["holdout"]) == (4, 5, 5)
    listed.write_text("0.jpg\nnowhere.jpg\n")
    assert finetune.main(args + [f"--subset={listed}", f"--out_dir={tmp_path / 'b'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nowhere.jpg" in err[0] and str(listed) in err[0]


def test_a_held_out_split_never_overlaps_what_is_trained_on(tmp_path):
    from byol_fast.datasets.index import build_index
    from conftest import write_noise_jpegs

    write_noise_jpegs(tmp_path / "train", 16)
    index = build_index(tmp_path / "train")
    listed = index.named(["0.jpg", "5.jpg", "10.jpg"], "list")
    names = [os.path.basename(index.files[i]) for i in listed]
    assert sorted(names) == ["0.jpg", "10.jpg", "5.jpg"]
    train, held = index.held_out(listed, 6, seed=0)
    assert train == listed and len(held) == 6 and not set(held) & set(listed)  # from the 13 others
    assert index.held_out(listed, 6, seed=0) == (train, held) and index.held_out(listed, 6, seed=1)[1] != held
    everything = list(range(16))  # linear evaluation, or a fraction of 1: the split comes out of training
    train, held = index.held_out(everything, 14, seed=0)
    assert len(train) == 2 and len(held) == 14 and sorted(train + held) == everything
    for bad in (0, 16):
        with pytest.raises(ValueError):
            index.held_out(everything, bad, seed=0)
    assert [os.path.basename(f) for f in index.take(held[:2]).files] == \
        [os.path.basename(index.files[i]) for i in held[:2]]


def test_finetune_recipes_follow_the_protocol():
    from byol_fast.config import FinetuneConfig

    for pct in (1, 10):
        cfg = load_config(ROOT / f"config/finetune_r50_in1k_{pct}pct.yaml", cls=FinetuneConfig)
        assert cfg.label_fraction == pct / 100 and (cfg.momentum, cfg.weight_decay, cfg.batch_size) == (0.9, 0.0, 1024)
        assert (cfg.data.image_size, cfg.data.resize, cfg.data.interp, cfg.features) == (224, 256, "cubic", "images")
        # BYOL Appendix C.1 (arXiv v3): learning rate swept over {0.005, 0.01, 0.02, 0.05, 0.1}, epochs
        # over {30, 50}, chosen on a local validation split; the recipe is a point of that grid.
        assert cfg.lr in (0.005, 0.01, 0.02, 0.05, 0.1) and cfg.epochs in (30, 50) and cfg.holdout == 0
    demo = load_config(ROOT / "config/finetune_demo.yaml", cls=FinetuneConfig)
    assert demo.label_fraction == 0.1 and demo.data.path == "data/demo"


@pytest.mark.slow
def test_finetune_with_two_processes(data_root, pretrain_ckpt, tmp_path):
    """gloo on the CPU: the encoder and head in DDP, each rank its share of the labelled subset."""
    import torch.multiprocessing as mp

    out = tmp_path / "ddp_ft"
    mp.spawn(_finetune_worker, args=(str(pretrain_ckpt), str(data_root), str(out)), nprocs=2)
    doc = json.loads((out / "results.json").read_text())
    assert doc["final"]["val_images"] == 12 and doc["train_images"] == 12 and len(doc["epochs"]) == 1


def _finetune_worker(rank, ckpt, data, out):
    from byol_fast import finetune

    ddp_env(rank, 2, 29900 + os.getppid() % 90)
    code = finetune.main(["--checkpoint", ckpt, "--data", data, f"--out_dir={out}", *FAST, "--epochs=1",
                          "--device=cpu", "--label_fraction=0.5", "--batch_size=4"])
    assert code == 0


def test_a_hold_out_larger_than_the_images_outside_the_subset_keeps_every_class(tmp_path):
    """When the images outside the labelled subset are too few, the rest of the split comes out of the
    subset, never its last image of a class; a split that cannot be held out is a one-line reason."""
    from byol_fast.datasets.index import build_index
    from conftest import write_noise_jpegs

    write_noise_jpegs(tmp_path / "train", 16)  # classes c0 and c1, 8 images each
    index = build_index(tmp_path / "train")
    listed = index.named(["0.jpg", "1.jpg", "2.jpg", "3.jpg"], "list")  # two of each class
    train, held = index.held_out(listed, 14, seed=0)  # the 12 others and 2 of the 4
    assert len(held) == 14 and set(train) | set(held) == set(range(16)) and not set(train) & set(held)
    assert sorted(index.labels[i] for i in train) == [0, 1]
    with pytest.raises(ValueError, match="would leave a class without a labelled image"):
        index.held_out(listed, 15, seed=0)


def test_a_sweep_sharing_one_out_dir_never_resumes_another_point(data_root, pretrain_ckpt, tmp_path, capsys):
    from byol_fast.evaluation.run import same_source

    args = ["--checkpoint", str(pretrain_ckpt), "--data", str(data_root), *FAST, "--epochs=1",
            f"--out_dir={tmp_path / 'sweep'}"]
    assert linear_eval.main(args + ["--lr=0.2"]) == 0
    capsys.readouterr()
    assert linear_eval.main(args + ["--lr=0.4"]) == 2
    assert "another evaluation" in capsys.readouterr().err
    source = json.loads((tmp_path / "sweep" / "results.json").read_text())["source"]
    older = {k: v for k, v in source.items() if k not in ("seed", "lr", "batch_size")}  # a run from before the recipe was recorded
    assert same_source(older, source) and not same_source({**older, "init": "random"}, source)
