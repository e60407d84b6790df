"""`python -m tests.bench`: see tests/bench/cli.py (or --help)."""

import sys

from tests.bench.cli import main

sys.exit(main())
