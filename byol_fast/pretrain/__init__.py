"""Pretraining: the learner (BYOL network, LARS, EMA target, mixed precision and DDP in one step:
``learner``), the kNN monitor and online probe (``monitors``) and the health signals logged with the
loss (``health``). The run itself, reading top to bottom, is the ``byol_fast.train`` command.

May import: ``runtime``, ``models``, ``optim``, ``weights``, ``datasets``, ``evaluation``,
``pipelines`` and the foundation modules.
"""
