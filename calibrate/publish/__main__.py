"""``python -m calibrate.publish run_dir=... area=...`` (see :mod:`calibrate.publish.cli`)."""

import sys

from calibrate.publish.cli import main

sys.exit(main())
