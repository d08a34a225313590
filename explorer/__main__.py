"""``python -m explorer``."""
import sys

from .app.cli import main

sys.exit(main())
