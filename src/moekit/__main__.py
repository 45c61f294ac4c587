"""``python -m moekit``: the ``moekit`` command, so that ``torchrun -m moekit train ...`` works."""

import sys

from .cli import main

sys.exit(main())
