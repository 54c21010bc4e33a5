#!/usr/bin/env python3
"""Rebalance shard plans: ``scripts/rebalance.py {plan,apply,watch,verify} --url URL ...``.

A thin wrapper around ``taskiq-redis-cluster rebalance``; see
``docs/runbook.md`` for the options and exit codes.
"""

from __future__ import annotations

import sys

from taskiq_redis_cluster._cli._main import main

if __name__ == "__main__":
    sys.exit(main(["rebalance", *sys.argv[1:]]))
