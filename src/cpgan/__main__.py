"""``python -m cpgan`` = the ``cpgan`` command."""
import sys

from .cli import main

sys.exit(main())
