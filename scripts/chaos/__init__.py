"""The fault-injection suite: real workers, a real cluster, real faults.

A dev tool run from a checkout (``python scripts/chaos.py``, or ``python -m
chaos`` from ``scripts/``); it needs the dev dependencies (taskiq-redis, for
the comparison broker) and is not part of the installed package.
:mod:`.harness` runs the scenarios, :mod:`.cli` parses arguments and prints.
docs/guarantees.md says what each scenario measured.
"""
