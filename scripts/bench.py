#!/usr/bin/env python3
"""Benchmark our brokers against taskiq-redis's cluster brokers.

Runs the ``bench`` package next to this file (scripts/bench/), from a
checkout with the dev dependencies installed::

    python scripts/bench.py --quick --json /tmp/bench.json
    python scripts/bench.py                      # the full run (several minutes)
    python scripts/bench.py --url redis://127.0.0.1:7000
    python scripts/bench.py -v --quick           # debug logging

See docs/performance.md for what is measured and the targets.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Python already puts this directory first on sys.path when it runs this
    # file; make it explicit for runners that do not (e.g. runpy.run_path).
    # The package scripts/bench/ wins over this module for ``import bench``.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from bench.cli import main

    sys.exit(main())
