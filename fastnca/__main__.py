"""``python -m fastnca``: the `fastnca` command."""

import sys

from fastnca.cli import main

sys.exit(main())
