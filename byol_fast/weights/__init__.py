"""Weights on disk: byol_fast's checkpoint format (``checkpoint``, its fields' schema in ``checkpoint_schema``) and its background writer (``checkpoint_writer``), reading
an encoder from any file byol_fast or a peer writes (``encoder_file``, ``backbone_match``), the
importers of other projects' releases (``importers``), and reading a file a user points at without
running code from it (``safe_load``, with ``unpickler``, ``safe_torch`` and ``safe_arrays``; first in a
child process under kernel limits, ``isolated_read``).

May import: ``runtime``, ``models`` and the foundation modules (``config``, ``constants``, ``errors``).
"""
