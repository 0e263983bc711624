"""``python -m fedrec``."""

import sys

from fedrec.cli import main

sys.exit(main())
