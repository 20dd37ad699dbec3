"""``python -m shardgate``: the same command line as the ``shardgate`` console script, for
when the venv's ``bin`` is not on PATH."""

import sys

from shardgate.cli import main

sys.exit(main())
