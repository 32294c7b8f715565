"""`python -m cli ...` runs the `ultramem` command line (what the console script calls)."""

import sys

from cli.main import main

sys.exit(main())
