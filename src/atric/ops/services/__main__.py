"""`python -m atric.ops.services ...`: the local stack's CLI."""

import sys

from atric.ops.services.cli import main

sys.exit(main())
