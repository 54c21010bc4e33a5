"""The side-by-side benchmark: our brokers against taskiq-redis's cluster brokers.

A dev tool run from a checkout (``python scripts/bench.py``, or ``python -m
bench`` from ``scripts/``); it needs the dev dependencies (taskiq-redis) and is
not part of the installed package. :mod:`.harness` measures, :mod:`.cli`
parses arguments and prints. docs/performance.md says what is measured.
"""
