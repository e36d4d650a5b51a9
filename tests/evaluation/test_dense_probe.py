"""The dense probe: mean IoU against a hand count, the dense demo's images against their
masks, and the probe end to end: on masks whose classes are the image's colour, any encoder's
feature map separates them well above chance."""
import json

import numpy as np
import torch
from PIL import Image

from byol_fast import data, dense_probe
from byol_fast.datasets.demo_segmentation import read_split
from byol_fast.evaluation.dense import confusion, mean_iou


def test_mean_iou_by_hand():
    # 2 x 3 pixels, classes 0..2. target 0 0 1 / 1 2 2, prediction 0 1 1 / 1 2 0.
    target = torch.tensor([[0, 0, 1], [1, 2, 2]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    conf = confusion(pred, target, 3)
    assert conf.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # IoU: class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 2 / (2 + 3 - 2) = 2/3; class 2: 1 / (2 + 1 - 1) = 1/2.
    assert abs(mean_iou(conf) - 100 * (1 / 3 + 2 / 3 + 1 / 2) / 3) < 1e-9
    # A class in neither masks nor predictions is left out of the mean, not counted as 0.
    assert abs(mean_iou(confusion(pred, target, 4)) - mean_iou(conf)) < 1e-9


def test_the_dense_demo_is_deterministic_and_its_masks_mark_texture_regions(tmp_path, capsys):
    args = ["--train-images", "6", "--val-images", "3", "--size", "48"]
    assert data.main(["demo-seg", str(tmp_path / "a"), *args]) == 0
    assert data.main(["demo-seg", str(tmp_path / "b"), *args]) == 0
    for split in ("train", "val"):
        for f in (tmp_path / "a" / split / "images").iterdir():
            assert f.read_bytes() == (tmp_path / "b" / split / "images" / f.name).read_bytes()
    images, masks, classes = read_split(tmp_path / "a", "train")
    assert images.shape == (6, 48, 48, 3) and masks.shape == (6, 48, 48) and len(classes) == 8
    for image, mask in zip(images, masks):
        regions = np.unique(mask)
        assert 2 <= len(regions) <= 3 and regions.max() < 8
        # Regions hold other textures: their mean colours differ.
        means = [image[mask == r].mean(axis=0) for r in regions]
        assert max(np.abs(means[0] - m).max() for m in means[1:]) > 1.0


def test_the_probe_separates_colour_regions(tmp_path, capsys):
    """Masks made by colour (left half red = class 0, right half blue = class 1): a per-pixel linear
    probe on even a random encoder's map gets them mostly right; chance is 50% pixel accuracy."""
    root = tmp_path / "colour"
    (root).mkdir()
    (root / "segmentation.json").write_text(json.dumps({"classes": ["red", "blue"]}))
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 6)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            cut = int(rng.integers(12, 36))
            image = np.zeros((48, 48, 3), np.uint8)
            image[:, :cut] = (200, 30, 30)
            image[:, cut:] = (30, 30, 200)
            mask = np.zeros((48, 48), np.uint8)
            mask[:, cut:] = 1
            Image.fromarray(image).save(root / split / "images" / f"{i}.png")
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    out = tmp_path / "r.json"
    assert dense_probe.main(["--init", "random", "--backbone", "tiny_resnet", "--data", str(root),
                             "--image-size", "32", "--epochs", "40", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["pixel_acc"] > 75 and result["miou"] > 55, result
    assert "val mIoU" in capsys.readouterr().out
    assert dense_probe.main(["--init", "random", "--data", str(root)]) == 2  # no backbone named
