"""Monitors of representation quality during pretraining: a kNN classifier and an online linear probe.

Both are optional and cheap next to a BYOL step; collapse statistics live in
:func:`byol_fast.pretrain.health.collapse_stats`.

kNN monitor (:class:`KnnMonitor`): features of a labelled "bank" (center crops of the training
split) and of the validation split, L2-normalised; each validation image takes its k = 20 most
cosine-similar bank images, and each of them votes for its class with weight exp(sim / T), T = 0.07:
the temperature-weighted vote of InstDisc (Wu et al. 2018, arXiv 1805.01978, section 3.4) used by
DINO's eval_knn.py. ``temperature <= 0`` gives plain majority votes instead (every neighbour weighs 1).
Across processes the bank stays sharded (each rank keeps its own part): queries are gathered, each
rank finds their k nearest neighbours in its shard, and the world's candidates are merged, which
gives exactly the single-process answer without ever holding the whole bank on one GPU.

Online probe (:class:`OnlineProbe`): a linear classifier trained on detached encoder features
(stop-gradient, so it cannot shape the representation) with its own SGD, as DeepMind's reference
trains one alongside BYOL; it reads out how linearly separable the features are while training runs.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn

from byol_fast.evaluation.accuracy import topk_correct
from byol_fast.evaluation.features import loader_features
from byol_fast.runtime import dist

# ---------------------------------------------------------------------------- kNN


def knn_neighbours(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, k: int,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar bank rows of each query: (similarities (Q, k), labels (Q, k)).

    query: (Q, D), bank: (N, D), any scale (both are L2-normalised here). Where the bank has fewer
    than k rows, the missing neighbours get similarity -inf and label 0, so they never win a vote.
    Queries go ``chunk`` at a time to bound the (chunk, N) similarity matrix.
    """
    query, bank = F.normalize(query, dim=1), F.normalize(bank.to(query.dtype), dim=1)
    kk = min(k, bank.shape[0])
    sims, labels = [], []
    for q in query.split(chunk):
        s, idx = (q @ bank.T).float().topk(kk, dim=1)
        sims.append(s)
        labels.append(bank_labels[idx])
    sim = torch.cat(sims) if sims else query.new_zeros(0, kk, dtype=torch.float32)
    lab = torch.cat(labels) if labels else bank_labels.new_zeros(0, kk)
    if kk < k:  # pad so that every rank returns (Q, k) for the merge
        sim = torch.cat([sim, sim.new_full((sim.shape[0], k - kk), float("-inf"))], dim=1)
        lab = torch.cat([lab, lab.new_zeros(lab.shape[0], k - kk)], dim=1)
    return sim, lab


def knn_votes(sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float = 0.07) -> torch.Tensor:
    """Class scores (Q, C) from neighbours' similarities and labels (Q, k).

    Each neighbour adds exp(sim / T) to its class (InstDisc/DINO), or 1 when ``temperature <= 0``
    (majority vote). Padded neighbours (sim = -inf) add 0.
    """
    if temperature > 0:
        weights = (sims / temperature).exp()
    else:
        weights = torch.isfinite(sims).float()
    scores = sims.new_zeros(sims.shape[0], num_classes)
    return scores.scatter_add_(1, labels, weights)


def merge_neighbours(sims: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge candidate lists: (Q, m) similarities and labels -> the best ``k`` of each row."""
    s, idx = sims.topk(min(k, sims.shape[1]), dim=1)
    return s, labels.gather(1, idx)


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, query: torch.Tensor, query_labels: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07) -> dict[str, float]:
    """kNN top-1/top-5 (%) of the queries against the bank; over all processes if distributed.

    Each rank passes its own shard of bank (N_r, D) and queries (Q_r, D) with int64 labels; every
    rank returns the same numbers. A collective: every rank must call it.
    """
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        query, query_labels, valid = dist.gather_padded(query, query_labels)
        sims, labels = knn_neighbours(query, bank, bank_labels, k)
        sims, labels = merge_neighbours(_all_gather_cat(sims), _all_gather_cat(labels), k)
        query_labels = query_labels[valid]
        sims, labels = sims[valid], labels[valid]
    else:
        sims, labels = knn_neighbours(query, bank, bank_labels, k)
    correct = topk_correct(knn_votes(sims, labels, num_classes, temperature), query_labels)
    n = max(len(query_labels), 1)
    top1, top5 = (correct * 100.0 / n).tolist()  # host sync: once per monitor run
    return {"knn/top1": top1, "knn/top5": top5}


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Equal-shaped (Q, m) tensors of every rank -> (Q, world * m), concatenated along dim 1."""
    parts = [torch.empty_like(t) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


class KnnMonitor:
    """kNN accuracy of an encoder: bank = labelled training images, queries = validation images.

    ``bank_loader`` and ``query_loader`` yield (images (B, 3, H, W) normalised, labels (B,) int64),
    this rank's shard; each run reads one whole epoch of each (``byol_fast.datasets.loaders.eval_loader``:
    resize + center crop, the same files every epoch). A smaller bank is a smaller index
    (``Index.sample``), not a cut loader.
    """

    def __init__(self, bank_loader, query_loader, num_classes: int, k: int = 20, temperature: float = 0.07):
        self.bank_loader, self.query_loader = bank_loader, query_loader
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def run(self, encoder: nn.Module, device: torch.device, amp_dtype: torch.dtype = torch.float32) -> dict[str, float]:
        """{'knn/top1': %, 'knn/top5': %}. A collective: every rank calls it at the same step.

        The encoder runs in eval mode (running batch-norm statistics) and is put back as it was.
        Features are stored in fp16 on CUDA (ranking by cosine needs no more), fp32 on the CPU.
        """
        store = torch.float16 if device.type == "cuda" else torch.float32
        bank, bank_labels = loader_features(encoder, self.bank_loader, device, amp_dtype, store)
        query, query_labels = loader_features(encoder, self.query_loader, device, amp_dtype, store)
        return knn_accuracy(bank, bank_labels, query, query_labels, self.num_classes, self.k, self.temperature)


# ---------------------------------------------------------------------------- online linear probe


class OnlineProbe:
    """A linear classifier on detached encoder features, trained step by step during pretraining.

    ``step(features (N, F), labels (N,))`` takes one SGD step (Nesterov momentum 0.9, constant lr;
    the features move under it, so a decaying lr would stop it tracking them) and accumulates loss
    and top-1 on the device; ``read()`` returns their means since the last read (one host sync).
    Gradients are averaged over processes, so every rank holds the same classifier. A collective
    when distributed: every rank calls ``step`` at the same steps.
    """

    def __init__(self, width: int, num_classes: int, device: torch.device, lr: float = 0.1, momentum: float = 0.9):
        self.head = nn.Linear(width, num_classes).to(device)
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=lr, momentum=momentum, nesterov=True)
        self._sums = torch.zeros(3, device=device)  # loss sum, correct, count

    def step(self, features: torch.Tensor, labels: torch.Tensor, ok: torch.Tensor | None = None) -> None:
        """One SGD step on ``features`` (N, F) and ``labels`` (N,). ``ok`` (device bool, the training step's
        finite flag): where false the features may be NaN, so they are zeroed and the loss weighted by 0:
        the head gets a zero gradient (its momentum still carries it a little) and the step is not
        counted. Decided on the device, without a host sync."""
        features = features.detach().float()  # stop-gradient: the probe never trains the encoder
        weight = torch.ones((), device=features.device) if ok is None else ok.float()
        if ok is not None:
            features = torch.where(ok, features, 0.0)
        logits = self.head(features)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        (loss * weight).backward()
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            self._average_gradients()
        self.optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()
            # In-place adds of device tensors launch kernels; torch.tensor(n, device=cuda) would sync.
            self._sums[0] += loss.detach() * len(labels) * weight
            self._sums[1] += correct * weight
            self._sums[2] += len(labels) * weight

    def _average_gradients(self) -> None:
        """One all-reduce of the flattened weight and bias gradients, divided by the world size."""
        grads = [p.grad for p in self.head.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat)
        flat /= tdist.get_world_size()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    def read(self) -> dict[str, float]:
        """Mean loss and top-1 (%) on the training batches since the last read, over all processes."""
        sums = self._sums.clone()
        if tdist.is_initialized():
            tdist.all_reduce(sums)
        loss, correct, count = sums.tolist()  # host sync: once per log interval
        self._sums.zero_()
        n = max(count, 1.0)
        return {"probe/train_loss": loss / n, "probe/train_top1": 100.0 * correct / n}

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
