"""``python -m bilevel.cli``: the command line (see :mod:`bilevel.cli`)."""

import sys

from bilevel.cli.commands import main

sys.exit(main())
