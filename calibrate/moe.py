"""``python -m calibrate.moe <run_dir> variable=<name> areas=cd|state`` (see :mod:`calibrate.publish.moe`)."""

import sys

from calibrate.publish.moe import main

if __name__ == "__main__":
    sys.exit(main())
