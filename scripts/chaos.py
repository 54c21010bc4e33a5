#!/usr/bin/env python3
"""Fault-injection suite for ClusterStreamBroker (and taskiq-redis, for comparison).

The whole suite is one command::

    python scripts/chaos.py --all --json chaos.json

It starts its own local Redis Cluster on free loopback ports, real
``taskiq worker`` processes and a producer, injects each fault, prints a
table (acknowledged, completed, lost, duplicated, dead-lettered and phantom
tasks, recovery times, worker deaths, duration) and stops every process it
started. ``--broker taskiq-redis`` runs the same faults against
taskiq-redis's RedisStreamClusterBroker. The same command is available as
``taskiq-redis-cluster chaos``.

A rolling deploy of three workers (each SIGTERMed and restarted in turn
while a backlog waits), on the stream and the list broker::

    python scripts/chaos.py --scenario rolling-restart --broker ours --broker ours-list

(about a minute per broker; ``--tasks 4000`` is the quick run CI does.)
"""

from __future__ import annotations

import sys

from taskiq_redis_cluster._cli._cmd_chaos import main

if __name__ == "__main__":
    sys.exit(main())
