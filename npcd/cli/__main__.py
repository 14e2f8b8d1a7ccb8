"""`python -m npcd.cli`: the same as the `npcd` command."""

import sys

from npcd.cli import main

sys.exit(main())
