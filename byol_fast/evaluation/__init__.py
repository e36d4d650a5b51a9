"""Evaluating an encoder: the linear-evaluation and fine-tuning run (``run``), its classifiers and
feature cache (``classifier``), features of a loader epoch (``features``), top-k accuracy
(``accuracy``) and the dense (segmentation) probe (``dense``).

May import: ``runtime``, ``models``, ``optim``, ``weights``, ``datasets``, ``pipelines`` and the
foundation modules.
"""
