"""`python -m alignfast.cli` is the `alignfast` command."""

import sys

from alignfast.cli import main

sys.exit(main())
