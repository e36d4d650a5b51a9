"""The throughput benchmark behind ``python benchmarks/throughput.py``, one concern per module.

- :mod:`.entries`: the stages by name and the ``NAME[:key=value...]`` entries of ``--stages``;
- :mod:`.settings`: the resolved settings (the JSON's ``settings``) and the recipe of each stage's config;
- :mod:`.machine`: software versions, load average and the peak host memory of the process tree;
- :mod:`.timing`: warm-up, calibration, timed windows and the data-wait fraction;
- :mod:`.stages`: what each stage runs (data path, shard set, BYOL step, linear evaluation, checkpoint);
- :mod:`.timebox`: a stage's time box within the run's budget, and the alarm that ends it;
- :mod:`.runner`: one stage with its status and memory, and the run over every stage;
- :mod:`.report`: links and ratios between stages, the Markdown printed at the end; :mod:`.plot`: the chart;
- :mod:`.progress`: the progress lines on stderr (stdout holds the results alone);
- :mod:`.targets`, :mod:`.table`: the public anchors and the table helpers ``benchmarks/gpu_table.py``
  shares. Both use the standard library alone, as gpu_table.py does.

Nothing is imported here, so that ``bench.table`` can be imported without torch.
"""
