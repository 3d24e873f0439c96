"""`python -m vlmtune` is the same as the `vlmtune` console script."""
import sys

from vlmtune.cli import main

sys.exit(main())
