"""``python -m l1fx.rewrite``: see :mod:`l1fx.rewrite.cli`."""
import sys

from .cli import main

sys.exit(main())
