"""Benchmarks of the anchored AdamW step (pytest-benchmark) and their report writer.

Run the CPU suite with ``pytest bench --benchmark-only --benchmark-json RESULTS.json``
and turn the results into tables and a plot with ``python -m bench.report RESULTS.json``.
``bench/gpu_suite.sh`` runs the tests and the GPU suite on a CUDA machine.
"""
