"""``python -m nemo_pp.assets``: see :mod:`nemo_pp.assets.cli`."""

import sys

from nemo_pp.assets.cli import main

sys.exit(main())
