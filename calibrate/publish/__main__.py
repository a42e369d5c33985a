"""``python -m calibrate.publish run_dir=... area=...`` (see :mod:`calibrate.publish.stage`)."""

import sys

from calibrate.publish.stage import main

sys.exit(main())
