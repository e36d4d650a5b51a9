"""What a labelled dataset is, whatever stores it: files (or shard samples) with a class index each.

:class:`LabelledSamples` holds the class-balanced subsets every dataset offers (the labelled
fraction of semi-supervised fine-tuning, a held-out split); :class:`Index` is an image folder's
checked list of files, built by ``byol_fast.datasets.index``."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

from byol_fast.datasets.image_check import MAX_PIXELS, reason_category
from byol_fast.datasets.label_files import KINDS
from byol_fast.errors import DatasetError


class LabelledSamples:
    """What an image folder's :class:`Index` and a shard set (``byol_fast.datasets.shard_set.ShardSet``)
    share: samples with ``labels`` (``-1`` when unlabelled) and ``classes``, and seeded subsets of
    them. A subclass says how to keep a subset (``_subset``)."""

    labels: list[int]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def labelled_fraction(self, fraction: float, seed: int) -> list[int]:
        """The positions of a seeded, class-balanced sample: round(fraction x images) of every class (at
        least one), in this index's order (the semi-supervised protocol's labelled subset)."""
        import numpy as np

        rng, keep, labels = np.random.default_rng(seed), [], np.asarray(self.labels)
        for label in range(self.num_classes):
            members = np.flatnonzero(labels == label)
            if len(members):
                n = max(1, round(fraction * len(members)))
                keep += rng.choice(members, min(n, len(members)), replace=False).tolist()
        return sorted(keep)

    def held_out(self, labelled: list[int], n: int, seed: int) -> tuple[list[int], list[int]]:
        """``(labelled, held)`` positions: ``n`` samples set aside as a local validation split (the BYOL
        paper picks its evaluation hyper-parameters on 10,009 ImageNet training images), drawn at random
        (seeded) from the samples outside ``labelled``, so that the labelled subset stays what it is;
        when those are fewer than ``n``, all of them and the rest drawn from ``labelled`` (taken out of
        it), never its last image of a class. A ValueError says why when ``n`` cannot be held out."""
        import numpy as np

        if not 0 < n < len(self.labels):
            raise ValueError(f"{n} held-out images of {len(self.labels)}: hold out at least one and leave some to train on")
        rng = np.random.default_rng([seed, 1])  # not the labelled subset's draw
        chosen = set(labelled)
        rest = [i for i in range(len(self.labels)) if i not in chosen]
        if len(rest) >= n:
            return sorted(labelled), sorted(rng.choice(rest, n, replace=False).tolist())
        left = Counter(self.labels[i] for i in chosen)
        taken = []
        for i in rng.permutation(sorted(chosen)).tolist():
            if len(rest) + len(taken) == n:
                break
            if left[self.labels[i]] > 1:
                left[self.labels[i]] -= 1
                taken.append(i)
        if len(rest) + len(taken) < n:
            raise ValueError(f"{n} held-out images of {len(self.labels)} would leave a class without a labelled "
                             f"image to train on (at most {len(rest) + len(taken)} can be held out)")
        taken_set = set(taken)
        return sorted(i for i in chosen if i not in taken_set), sorted(rest + taken)

    def take(self, positions: list[int]) -> "LabelledSamples":
        """The samples at ``positions`` (ascending), as an index of the same kind."""
        return self._subset(list(positions))

    def sample(self, n: int, seed: int) -> "LabelledSamples":
        """An index of ``n`` of these files drawn at random (seeded), kept in this index's order;
        the whole index when ``n`` is 0 or not smaller."""
        if not 0 < n < len(self.labels):
            return self
        import numpy as np

        return self._subset(np.sort(np.random.default_rng(seed).choice(len(self.labels), n, replace=False)).tolist())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labelled(self) -> bool:
        """True for a class tree; False for a flat folder (labels all -1)."""
        return bool(self.classes)

    def _subset(self, keep: list[int]) -> "LabelledSamples":
        raise NotImplementedError


@dataclass
class Index(LabelledSamples):
    """Decodable images of one folder, in ImageFolder order.

    files: absolute paths; labels: class index per file (``-1`` for a flat folder); classes: sorted
    class-folder names (empty for a flat folder; for a flat folder labelled by a label file, those of
    the ``train/`` beside it, see ``labels_from``); root: the absolute folder; skipped: (path, reason)
    for every candidate left out (and empty class folders); kinds: what each kept file really is.
    checked / reused: files decoded by this call / taken from the cache (0 / len(files) on a
    fully cached second scan).
    """

    root: str
    files: list[str]
    labels: list[int]
    classes: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    index_path: str | None = None
    report_path: str | None = None
    checked: int = 0
    reused: int = 0
    max_pixels: int = MAX_PIXELS
    # Where the labels of a flat folder came from (byol_fast.datasets.label_files.LabelSource.record);
    # None when the class folders are the labels.
    labels_from: dict | None = None
    # (size, mtime_ns) per path, kept and cacheable skipped files alike: the cache key.
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def named(self, names: list[str], source: str) -> list[int]:
        """The positions of the files whose base names are ``names`` (a published subset list, e.g.
        ImageNet's 1% split); a DatasetError naming the first name that is not in this index, or that
        names several files."""
        where: dict[str, list[int]] = {}
        for i, f in enumerate(self.files):
            where.setdefault(os.path.basename(f), []).append(i)
        missing = [n for n in names if n not in where]
        if missing:
            raise DatasetError(f"{source}: {len(missing)} listed images are not in {self.root} (e.g. {missing[0]})")
        several = [n for n in names if len(where[n]) > 1]
        if several:
            raise DatasetError(f"{source}: {several[0]} names {len(where[several[0]])} files of {self.root}")
        return sorted({where[n][0] for n in names})

    def _subset(self, keep: list[int]) -> "Index":
        return dataclasses.replace(self, files=[self.files[i] for i in keep], labels=[self.labels[i] for i in keep],
                                   kinds=[self.kinds[i] for i in keep] if self.kinds else [])

    def skip_counts(self) -> Counter:
        """Number of skipped entries per reason category."""
        return Counter(reason_category(reason) for _, reason in self.skipped)

    def summary(self) -> str:
        """A few human-readable lines: kept, kinds, skipped by reason, classes, where files are."""
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(self.kinds).most_common())
        skips = ", ".join(f"{k} {n}" for k, n in sorted(self.skip_counts().items())) or "none"
        lines = [
            f"index of {self.root}",
            f"  kept     {len(self.files)} images ({kinds})",
            f"  skipped  {len(self.skipped)} ({skips})",
            f"  classes  {self.num_classes}" if self.labelled else "  classes  none (flat folder, labels -1)",
            *([f"  labels   {_describe(self.labels_from)}"] if self.labels_from else []),
            f"  decoded  {self.checked} files now, {self.reused} reused from the cache",
            f"  index    {self.index_path or 'not written'}",
            f"  report   {self.report_path or 'not written'}",
        ]
        return "\n".join(lines)


def _describe(labels_from: dict) -> str:
    """The summary's line on a label file: which files, of what kind, and whose class folders."""
    kind = KINDS.get(labels_from.get("kind"), labels_from.get("kind"))
    return f"{' + '.join(labels_from.get('files', []))} ({kind}), classes of {labels_from.get('classes_from')}"
