"""Data on disk and on object storage: the checked index of an image folder (``index``, its file in
``index_file``, the image checks in ``image_check``, the labelled samples in ``samples``, labels of a
flat folder from the files ImageNet ships in ``label_files``, and the bounded reading of JSON and paths
a user's files hold in ``untrusted``), tar shards
(packed by ``shard_pack``, opened and verified by ``shard_set``, on S3 through ``object_store``),
opening whatever ``data.path`` names (``open_dataset``), the loaders a config asks for (``loaders``,
built on ``pipelines/``), and the generated demo datasets (``demo``, ``demo_segmentation``).

May import: ``runtime``, ``pipelines`` and the foundation modules (``config``, ``constants``,
``errors``).
"""
