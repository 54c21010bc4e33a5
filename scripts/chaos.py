#!/usr/bin/env python3
"""Fault-injection suite for ClusterStreamBroker (and taskiq-redis, for comparison).

The whole suite is one command::

    python scripts/chaos.py --all --json chaos.json

It starts its own local Redis Cluster on free loopback ports, real
``taskiq worker`` processes and a producer, injects each fault, prints a
table (acknowledged, completed, lost, duplicated, dead-lettered and phantom
tasks, recovery times, worker deaths, duration) and stops every process it
started. ``--broker taskiq-redis`` runs the same faults against
taskiq-redis's RedisStreamClusterBroker. It runs the ``chaos`` package next
to this file (scripts/chaos/), from a checkout with the dev dependencies
installed; the installed package has no chaos command.

A rolling deploy of three workers (each SIGTERMed and restarted in turn
while a backlog waits), on the stream and the list broker::

    python scripts/chaos.py --scenario rolling-restart --broker ours --broker ours-list

(about a minute per broker; ``--tasks 4000`` is the quick run CI does.)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Python already puts this directory first on sys.path when it runs this
    # file; make it explicit for runners that do not (e.g. runpy.run_path).
    # The package scripts/chaos/ wins over this module for ``import chaos``.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from chaos.cli import main

    sys.exit(main())
