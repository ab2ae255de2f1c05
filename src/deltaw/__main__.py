"""`python -m deltaw ...` is the `deltaw` command (what `torchrun -m deltaw train ...` runs on every rank)."""

import sys

from deltaw.cli import main

sys.exit(main())
