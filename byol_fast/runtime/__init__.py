"""The process a command runs in: distributed setup (``dist``), the run's process, stopping and
saving on signals (``process``), device and precision (``device``), how a command ends on a user
error (``cli``), the run folder checked before the work (``out_dir``), progress lines and throughput
(``progress``) and the TensorBoard writer (``tensorboard``).

May import: ``byol_fast.config``, ``byol_fast.constants``, ``byol_fast.errors``; nothing else of the
project, so every other layer can stand on it.
"""
