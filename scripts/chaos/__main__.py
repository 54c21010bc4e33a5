"""``python -m chaos`` (from ``scripts/``): the same as ``python scripts/chaos.py``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
