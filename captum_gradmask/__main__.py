"""``python -m captum_gradmask ...`` runs the command line (what torchrun launches with -m)."""

import sys

from captum_gradmask.cli import main

if __name__ == "__main__":
    sys.exit(main())
