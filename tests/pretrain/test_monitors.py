"""Monitors: top-k and kNN against hand-worked examples, the online probe against a plain SGD step,
the distributed versions against the single-process ones (2 gloo processes)."""
import io
import math

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from byol_fast.datasets.samples import Index
from byol_fast.pretrain.health import collapse_stats
from byol_fast.pretrain.monitors import KnnMonitor, OnlineProbe, knn_accuracy, knn_neighbours, knn_votes
from byol_fast.evaluation.accuracy import topk_correct


def at(degrees, scale=1.0):
    """A 2-d point at this angle (cosine similarity ignores the scale)."""
    r = math.radians(degrees)
    return [scale * math.cos(r), scale * math.sin(r)]


def test_topk_correct_hand_example():
    # Ranking of the first three rows: class 3 (0.9), 1 (0.5), 5 (0.3), 2 (0.2), 0 (0.1), 4 (0.0).
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # label 3: first
                           [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # label 2: fourth
                           [0.1, 0.5, 0.2, 0.9, 0.0, 0.3],   # label 4: last
                           [0.7, 0.1, 0.0, 0.0, 0.0, 0.0]])  # label 1: second
    labels = torch.tensor([3, 2, 4, 1])
    assert topk_correct(scores, labels, (1, 2, 5)).tolist() == [1.0, 2.0, 3.0]
    # Fewer classes than k: every row counts.
    assert topk_correct(torch.randn(3, 2), torch.tensor([0, 1, 1]), (1, 5))[1].item() == 3.0


def hand_bank():
    """Bank on the unit circle (scaled, to check that similarity is cosine), labels, and two queries."""
    bank = torch.tensor([at(5, 3.0), at(30, 0.5), at(-30, 2.0), at(180, 1.0)])
    labels = torch.tensor([1, 0, 0, 1])
    return bank, labels


def test_knn_weighted_vote_matches_hand_computation():
    bank, labels = hand_bank()
    query = torch.tensor([at(0, 7.0)])
    sims, nb = knn_neighbours(query, bank, labels, k=3)
    # Neighbours of 0 degrees: 5 (class 1), then +-30 (class 0); 180 is left out.
    assert torch.allclose(sims[0], torch.tensor([math.cos(math.radians(a)) for a in (5, 30, 30)]), atol=1e-6)
    assert nb[0, 0].item() == 1 and sorted(nb[0, 1:].tolist()) == [0, 0]
    T = 0.05
    votes = knn_votes(sims, nb, num_classes=2, temperature=T)
    expected = [2 * math.exp(math.cos(math.radians(30)) / T), math.exp(math.cos(math.radians(5)) / T)]
    assert torch.allclose(votes[0], torch.tensor(expected), rtol=1e-5)
    assert votes[0].argmax().item() == 1  # the one close neighbour outweighs two far ones
    # Plain majority (temperature <= 0): two votes against one.
    assert knn_votes(sims, nb, 2, temperature=0).tolist() == [[2.0, 1.0]]


def test_knn_pads_a_bank_smaller_than_k():
    bank, labels = hand_bank()
    sims, nb = knn_neighbours(torch.tensor([at(0)]), bank, labels, k=6)
    assert sims.shape == (1, 6) and torch.isinf(sims[0, 4:]).all()
    votes = knn_votes(sims, nb, 2, temperature=0)
    assert votes.tolist() == [[2.0, 2.0]]  # the four real neighbours only


def test_knn_accuracy_hand_example():
    bank, labels = hand_bank()
    query = torch.tensor([at(0), at(175), at(-25)])
    query_labels = torch.tensor([1, 1, 1])
    # k=1: neighbours 5 (1), 180 (1), -30 (0) -> 2 of 3 right; top-5 covers both classes.
    acc = knn_accuracy(bank, labels, query, query_labels, num_classes=2, k=1)
    assert acc["knn/top1"] == pytest.approx(200 / 3) and acc["knn/top5"] == 100.0


def test_knn_monitor_uses_eval_mode_and_restores_it():
    bank, labels = hand_bank()
    encoder = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(2))
    encoder.train()
    # Eval mode with fresh running statistics (mean 0, var 1) is the identity up to eps.
    bank_loader = [(bank[:2].view(2, 2, 1, 1), labels[:2]), (bank[2:].view(2, 2, 1, 1), labels[2:])]
    query_loader = [(torch.tensor([at(0), at(175), at(-25)]).view(3, 2, 1, 1), torch.tensor([1, 1, 1]))]
    monitor = KnnMonitor(bank_loader, query_loader, num_classes=2, k=1)
    acc = monitor.run(encoder, torch.device("cpu"))
    assert acc["knn/top1"] == pytest.approx(200 / 3)
    assert encoder.training and encoder[1].num_batches_tracked.item() == 0
    # Without the 180-degree bank point (a smaller bank), the query at 175 degrees is lost.
    smaller = KnnMonitor(bank_loader[:1] + [(bank[2:3].view(1, 2, 1, 1), labels[2:3])], query_loader, 2, k=1)
    assert smaller.run(encoder, torch.device("cpu"))["knn/top1"] == pytest.approx(100 / 3)


def test_a_smaller_bank_is_a_seeded_random_sample_of_every_class():
    """monitor.knn_bank_limit: an index in class order, sampled; a cut would keep the first class only."""
    files = [f"/r/c{i // 10}/{i:02d}.jpg" for i in range(40)]
    index = Index(root="/r", files=files, labels=[i // 10 for i in range(40)], classes=["c0", "c1", "c2", "c3"],
                  kinds=["JPEG:RGB"] * 40)
    small = index.sample(8, seed=0)
    assert len(small) == 8 and set(small.files) < set(files) and small.files == sorted(small.files)
    assert all(f"/c{label}/" in f for f, label in zip(small.files, small.labels))  # labels stay with their files
    assert len(set(small.labels)) > 1 and small.classes == index.classes
    assert index.sample(8, seed=0).files == small.files != index.sample(8, seed=1).files
    assert index.sample(0, seed=0) is index and index.sample(40, seed=0) is index


def test_collapse_stats_hand_cases():
    collapsed = torch.ones(64, 16) * torch.tensor([3.0])
    stats = collapse_stats(collapsed)
    assert stats["collapse/std"].item() == 0.0 and stats["collapse/dead_fraction"].item() == 1.0
    gauss = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0))
    # Gaussian directions: each coordinate of a unit vector has std 1/sqrt(d).
    assert collapse_stats(gauss)["collapse/std_x_sqrt_d"].item() == pytest.approx(1.0, abs=0.05)


def test_probe_learns_without_touching_the_encoder():
    g = torch.Generator().manual_seed(0)
    encoder = nn.Linear(4, 8)
    probe = OnlineProbe(8, 2, torch.device("cpu"), lr=0.1)
    for _ in range(60):
        x = torch.randn(32, 4, generator=g)
        y = (x[:, 0] > 0).long()
        probe.step(encoder(x), y)
    assert encoder.weight.grad is None  # stop-gradient
    probe.read()
    x = torch.randn(256, 4, generator=g)
    with torch.no_grad():
        feats = encoder(x)
        held_out = (probe.head(feats).argmax(dim=1) == (x[:, 0] > 0).long()).float().mean()
    assert held_out > 0.9
    reading = probe.read()
    assert reading == {"probe/train_loss": 0.0, "probe/train_top1": 0.0}  # read resets


def test_probe_step_is_plain_sgd_and_state_round_trips():
    torch.manual_seed(0)
    probe = OnlineProbe(5, 3, torch.device("cpu"), lr=0.5)
    ref = nn.Linear(5, 3)
    ref.load_state_dict(probe.head.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, nesterov=True)
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    for _ in range(3):
        probe.step(x, y)
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    assert torch.allclose(probe.head.weight, ref.weight, atol=1e-6)
    saved = io.BytesIO()  # through bytes, as a checkpoint goes: no tensor shared between the two
    torch.save(probe.state_dict(), saved)
    saved.seek(0)
    twin = OnlineProbe(5, 3, torch.device("cpu"), lr=0.5)
    twin.load_state_dict(torch.load(saved))
    probe.step(x, y)
    twin.step(x, y)
    assert torch.equal(probe.head.weight, twin.head.weight)


# ---------------------------------------------------------------------------- two processes


def _worker(rank, world, init_file, bank, bank_labels, query, query_labels, x, y, out):
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Unequal shards: rank 0 gets more queries than rank 1.
        acc = knn_accuracy(bank[rank::world], bank_labels[rank::world], query[: 5] if rank == 0 else query[5:],
                           query_labels[: 5] if rank == 0 else query_labels[5:], num_classes=3, k=4)
        torch.manual_seed(0)
        probe = OnlineProbe(6, 3, torch.device("cpu"), lr=0.3)
        half = len(x) // world
        probe.step(x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half])
        torch.save({"acc": acc, "weight": probe.head.weight.detach(), "read": probe.read()}, f"{out}.{rank}")
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_distributed_knn_and_probe_equal_single_process(tmp_path):
    g = torch.Generator().manual_seed(1)
    bank, bank_labels = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    query, query_labels = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    out = tmp_path / "result"
    mp.spawn(_worker, args=(2, tmp_path / "init", bank, bank_labels, query, query_labels, x, y, out), nprocs=2)
    single = knn_accuracy(bank, bank_labels, query, query_labels, num_classes=3, k=4)
    torch.manual_seed(0)
    ref = OnlineProbe(6, 3, torch.device("cpu"), lr=0.3)
    ref.step(x, y)  # the whole batch in one process: the mean of the two halves' gradients
    ref_read = ref.read()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["acc"] == pytest.approx(single)
        assert torch.allclose(got["weight"], ref.head.weight, atol=1e-6)
        assert got["read"] == pytest.approx(ref_read, rel=1e-5)


def test_pair_retrieval_hand_cases():
    from byol_fast.pretrain.health import pair_retrieval

    z = torch.eye(4) * 3.0
    assert pair_retrieval(z * 2, z).item() == 1.0  # scale does not matter, own pair always closest
    assert pair_retrieval(z[[1, 0, 3, 2]], z).item() == 0.0  # every prediction points at another image
    shared = torch.ones(4, 4) + 0.01 * torch.eye(4)[[1, 2, 3, 0]]  # a common direction, nudged wrongly
    assert pair_retrieval(shared, torch.ones(4, 4) + 0.01 * torch.eye(4)).item() == 0.0
    half = torch.stack([z[0], z[1], z[0], z[1]])
    assert pair_retrieval(half, z).item() == 0.5
