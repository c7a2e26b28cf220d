"""``python -m bench`` is the ``ifbench`` command."""

import sys

from bench.cli import main

sys.exit(main())
