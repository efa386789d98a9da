"""``python -m resilient_voice demo``."""

import sys

from resilient_voice.cli import main

sys.exit(main())
