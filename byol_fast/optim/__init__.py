"""Optimisation: the LARS optimiser with its parameter groups (``lars``) and the learning-rate and
EMA schedules (``schedules``), shared by pretraining and evaluation.

May import: ``byol_fast.config``, ``byol_fast.constants``, ``byol_fast.errors``.
"""
