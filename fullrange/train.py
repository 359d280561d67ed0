"""`python -m fullrange.train` (from an installed package): the same as launcher/train.py in a clone,
e.g. `accelerate launch -m fullrange.train ...`. See fullrange.cli.train_main."""
import sys

from fullrange.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
