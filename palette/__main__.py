"""`python -m palette`: the same as the `palette` command."""

import sys

from .cli import main

sys.exit(main())
