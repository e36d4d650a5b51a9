"""DALI graphs for byol_fast, and the torchvision reference they are tested against.

- :mod:`pipelines.pretrain`: the two-view BYOL augmentation graph (one function, ``device`` "cpu"|"gpu").
- :mod:`pipelines.loader`: :class:`DaliTwoViewLoader`, the pretraining graph as an iterable of torch tensors.
- :mod:`pipelines.linear_eval`: train/val graphs and loader for linear evaluation.
- :mod:`pipelines.reference`: the same recipe with torchvision transforms on PIL images (baseline + test oracle).

Every loader yields images as float32 ``(N, 3, H, W)`` tensors whose memory is NHWC (channels_last):
DALI writes HWC, and a ``permute`` makes the NCHW view for free.

Modules are imported lazily so that ``import pipelines.reference`` works without DALI installed.
"""
