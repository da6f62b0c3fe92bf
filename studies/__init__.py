"""The machinery of ``reproduce.py`` (the command): the paper's studies run through the entry points.

- ``recipes``: the flags of each kind of run at each scale (paper, small, quick), and the kinds of evaluation;
- ``paper``: the paper's studies (what each varies and measures) and its numbers;
- ``plan``: the runs the studies need, each once, their folders and command lines;
- ``data``: the ``--data_path`` the runs get (a split or a subset, as links in the work dir);
- ``runner``: running the runs here or submitting them to SLURM, with progress and their timings;
- ``report`` and ``charts``: each study's table, numbers and plot.
"""
