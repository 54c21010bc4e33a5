#!/usr/bin/env python3
"""Benchmark our brokers against taskiq-redis's cluster brokers.

A thin wrapper around ``taskiq-redis-cluster bench`` (the logic lives in
``taskiq_redis_cluster._bench``)::

    python scripts/bench.py --quick --json /tmp/bench.json
    python scripts/bench.py                      # the full run (several minutes)
    python scripts/bench.py --url redis://127.0.0.1:7000
    python scripts/bench.py -v --quick           # debug logging

See docs/performance.md for what is measured and the targets.
"""

from __future__ import annotations

import sys

from taskiq_redis_cluster._cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    verbose = [a for a in args if a in ("-v", "--verbose")]
    rest = [a for a in args if a not in ("-v", "--verbose")]
    sys.exit(main([*verbose[:1], "bench", *rest]))
