"""Semi-supervised fine-tuning: the whole pretrained network trained with a fraction of the labels.

``python -m byol_fast.finetune --checkpoint RUN/last.pt --data DATA [--label_fraction 0.1 | --subset FILE] [--init random] [--config C] [--key=value ...]``

The protocol of BYOL's semi-supervised results (Appendix C.1, SimCLR's protocol): the encoder is
initialised from the checkpoint (any file linear evaluation reads), a linear layer is put on its
pooled features, and both are trained with cross entropy on the labelled subset only: a seeded,
class-balanced ``label_fraction`` of DATA/train (``--label_fraction=0.01`` or ``0.1``), or the images
a ``--subset`` file lists, one file name per line (the format ImageNet's published 1% and 10% splits
come in). SGD with Nesterov momentum 0.9, no weight decay, cosine decay per step; training images:
random resized crop + flip; validation (all of DATA/val): resize + center crop. Top-1/top-5 after
every epoch to the console, TensorBoard and ``results.json`` in ``finetune_<pct>pct/`` beside the
checkpoint; it checkpoints every epoch and resumes by itself; several GPUs under torchrun (SyncBN,
DDP). ``--init random`` trains the same network from scratch on the same labels: what pretraining bought.
``--holdout=N`` validates on N training images outside the labelled subset instead of DATA/val: the
paper's way of choosing the learning rate and the epochs (a local split of 10,009 images).
Recipes: ``config/finetune_r50_in1k_{1,10}pct.yaml``, ``config/finetune_demo.yaml``.
"""
from __future__ import annotations

import sys

from byol_fast.config import FinetuneConfig
from byol_fast.evaluation.run import run_command


def main(argv: list[str] | None = None) -> int:
    return run_command("python -m byol_fast.finetune", __doc__, argv, FinetuneConfig)


if __name__ == "__main__":
    sys.exit(main())
