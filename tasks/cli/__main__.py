"""`python -m tasks.cli`: the same as the `capsule` command."""

import sys

from tasks.cli import main

sys.exit(main())
