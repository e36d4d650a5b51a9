"""PixPro's pieces (byol_fast/models/pixpro.py) against hand computations and direct formulas written here
with plain loops: the positive pairs for known crop windows and flips, the pixel propagation module,
the loss."""

import torch
import torch.nn.functional as F

from byol_fast.models.pixpro import PixelPropagation, correspondence, pixpro_loss


def boxes(*b):
    return torch.tensor(b, dtype=torch.float32)


def flips(*f):
    return torch.tensor(f, dtype=torch.bool)


def test_positive_pairs_for_known_crops_by_hand():
    # A 100 x 100 image. View 1: the whole image; view 2: its top-left quarter. 2 x 2 feature maps.
    # View 1's bin centres: (25, 25) (75, 25) (25, 75) (75, 75), diagonal hypot(50, 50) = 70.7;
    # view 2's: (12.5, 12.5) (37.5, 12.5) (12.5, 37.5) (37.5, 37.5), diagonal 35.4. The larger
    # diagonal sets the distance: 0.7 x 70.7 = 49.5. Distances by hand: from (25, 25) at most 17.7
    # (all pairs); from (75, 25): 63.7, 39.5, 63.7, 39.5; from (25, 75): 63.7, 63.7, 39.5, 39.5;
    # from (75, 75): 88.4, 68.0, 68.0, 53.0 (none).
    mask = correspondence(boxes([0, 0, 100, 100]), flips(False), boxes([0, 0, 50, 50]), flips(False), 2, 2)
    assert mask[0].tolist() == [[True, True, True, True],
                                [False, True, False, True],
                                [False, False, True, True],
                                [False, False, False, False]]


def test_a_flip_on_one_view_only_mirrors_its_bins():
    # Both views the same window [0, 40] x [0, 20], 1 x 2 feature map (bins left and right, centres at
    # x = 10 and 30, y = 10; diagonal hypot(20, 20) = 28.3, limit 19.8). View 2 mirrored: its left bin
    # shows x = 30 and its right bin x = 10, so bins of the same index are 20 apart (not a pair) and
    # opposite bins 0 apart (a pair).
    same = correspondence(boxes([0, 0, 40, 20]), flips(False), boxes([0, 0, 40, 20]), flips(False), 1, 2)
    mirrored = correspondence(boxes([0, 0, 40, 20]), flips(False), boxes([0, 0, 40, 20]), flips(True), 1, 2)
    assert same[0].tolist() == [[True, False], [False, True]]
    assert mirrored[0].tolist() == [[False, True], [True, False]]
    both = correspondence(boxes([0, 0, 40, 20]), flips(True), boxes([0, 0, 40, 20]), flips(True), 1, 2)
    assert both[0].tolist() == same[0].tolist()  # mirroring both views changes no pair


def test_crops_that_do_not_overlap_have_no_positive_pair_and_images_are_independent():
    mask = correspondence(boxes([0, 0, 10, 10], [0, 0, 100, 100]), flips(False, False),
                          boxes([90, 90, 100, 100], [0, 0, 100, 100]), flips(False, False), 7, 7)
    assert not mask[0].any()
    assert torch.equal(mask[1], torch.eye(49, dtype=torch.bool))  # identical views: each bin with itself only


def test_the_propagation_module_is_the_direct_formula():
    torch.manual_seed(0)
    ppm = PixelPropagation(5, gamma=2.0)
    x = torch.randn(2, 5, 3, 4)
    y = ppm(x)
    g = ppm.transform(x)
    for n in range(2):
        pixels = [(i, j) for i in range(3) for j in range(4)]
        for a, (i, j) in enumerate(pixels):
            out = torch.zeros(5)
            for (k, m) in pixels:
                s = max(F.cosine_similarity(x[n, :, i, j], x[n, :, k, m], dim=0).item(), 0.0) ** 2
                out += s * g[n, :, k, m] / g[n, :, k, m].norm()
            assert torch.allclose(y[n, :, i, j], out, atol=1e-5), (n, i, j)


def test_the_loss_is_the_negative_cosine_over_positive_pairs_both_ways():
    torch.manual_seed(1)
    y1, y2, t1, t2 = (torch.randn(3, 4, 2, 2) for _ in range(4))
    positive = torch.rand(3, 4, 4) > 0.5
    positive[2] = False  # an image without any pair adds zero
    got = pixpro_loss(y1, y2, t1, t2, positive)
    total = 0.0
    for n in range(3):
        pairs = [(i, j) for i in range(4) for j in range(4) if positive[n, i, j]]
        if not pairs:
            continue
        v = lambda t, k: t[n].flatten(1)[:, k]  # noqa: E731
        fwd = sum(F.cosine_similarity(v(y1, i), v(t2, j), dim=0) for i, j in pairs) / len(pairs)
        bwd = sum(F.cosine_similarity(v(y2, j), v(t1, i), dim=0) for i, j in pairs) / len(pairs)
        total += -(fwd + bwd)
    assert torch.allclose(got, total / 3, atol=1e-6)
    # The target carries no gradient; the online pixels do.
    y1.requires_grad_(True)
    t2.requires_grad_(True)
    pixpro_loss(y1, y2, t1, t2, positive).backward()
    assert y1.grad is not None and t2.grad is None
