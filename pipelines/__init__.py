"""Data pipelines for byol_fast: DALI graphs, their loaders, and the torchvision references.

- :mod:`pipelines.contract`: the loader contract every loader follows, and :func:`rank_files`, the one
  answer to "which files does rank r read in epoch e".
- :mod:`pipelines.decode`: reading, decoding and normalising, the ends every DALI graph shares.
- :mod:`pipelines.colour`: colour jitter and grayscale as per-image matrices, in numpy: the reference
  the DALI graph's own matrices (built by DALI operators in :mod:`pipelines.pretrain`) are tested against.
- :mod:`pipelines.pretrain`: the two-view BYOL augmentation graph (one graph, ``device`` "cpu"|"gpu").
- :mod:`pipelines.evaluation`: linear evaluation's (and the kNN monitor's) training and validation graphs.
- :mod:`pipelines.loader`: the DALI graphs as loaders of torch tensors.
- :mod:`pipelines.reference`: the same recipes with torchvision transforms on PIL images (baseline + test oracle).

This package knows the configuration (``byol_fast.config``), the image constants and the errors
(``byol_fast.errors``), nothing else of byol_fast. Every loader yields images as float32
``(N, 3, H, W)`` tensors; DALI's are NHWC in memory (channels_last): DALI writes HWC, and a
``permute`` makes the NCHW view for free.

Modules are imported lazily so that ``import pipelines.reference`` works without DALI installed.
"""
