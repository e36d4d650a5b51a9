"""Linear evaluation: a linear classifier trained on the frozen pretrained encoder.

``python -m byol_fast.linear_eval --checkpoint RUN/last.pt --data DATA [--init random] [--config C] [--key=value ...]``

DATA holds ``train/`` and ``val/`` ImageFolder trees with the same class folders. The protocol is the
one behind the published top-1 (docs/reference.md section 1, BYOL Appendix C.1):

- the encoder is frozen: eval mode (batch norm uses its running statistics), no gradients;
- a linear layer on its pooled features (2048-d for ResNet-50), initialised N(0, 0.01), bias 0;
- training images: random resized crop + horizontal flip; validation: resize the shorter side to
  256, center crop 224;
- SGD, Nesterov momentum 0.9, no weight decay, batch 1024, cosine decay per step without warm-up,
  lr = 0.2 x batch / 256 (DeepMind's eval config; the paper sweeps {0.05, ..., 0.4} on a local
  validation split of 10,009 training images and reports the best: ``--holdout=10009`` validates on
  such a split, held out of train/, instead of val/); 90 epochs here (DeepMind: 80; mmpretrain: 90).

Top-1 and top-5 on the validation split are printed, written to TensorBoard and to
``results.json`` after every epoch. ``last.pt`` (atomic, every epoch) holds the classifier, the
optimizer, the encoder it was trained on and the RNG; the run resumes from its folder by itself.
A preempted run (SIGTERM/SIGUSR1) exits with status 75 and repeats the interrupted epoch on resume.
Multi-GPU: one process per GPU under torchrun; the classifier is wrapped in DDP, the encoder is
replicated, each rank reads its shard of both splits.

``--features=cached`` is a fast path for small datasets on the CPU: features of center crops of the
training images are computed once and the classifier trains on them (the encoder is frozen, so
they never change); it skips the training augmentation, so it is not the published protocol.
"""
from __future__ import annotations

import sys

from byol_fast.config import LinearConfig
from byol_fast.evaluation.run import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m byol_fast.linear_eval", __doc__, argv, LinearConfig)


if __name__ == "__main__":
    sys.exit(main())
