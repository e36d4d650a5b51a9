"""The networks: encoders (``resnet``, with TensorFlow's SAME padding in ``same_padding``), the BYOL
towers and predictor (``byol``), the BYOL loss (``loss``), PixPro's pixel heads and loss (``pixpro``)
and the frozen encoder as a feature API (``feature_extractor``).

May import: ``byol_fast.config``, ``byol_fast.constants``, ``byol_fast.errors``. Nothing here reads a
file or knows a dataset.
"""
