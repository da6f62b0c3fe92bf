"""The pieces of benchmarks/gpu_check.py, one job a module: ``plan`` (what each part runs, on a GPU and in
--smoke), ``jobs`` (the subprocesses, their time limits and the budget), ``environment`` (part 1), ``correctness``
(part 2: the kill-and-resume checks and the downstream scripts), ``speed`` (parts 3 and 4: bench_step.py and
bench_input.py, and the compile warm-up that runs during part 2), ``report`` (the targets, report.md). Like the
script, they import neither the repository's modules nor torch (except part 1's measurement, in its own
subprocess)."""
