"""Entry point: see `python launcher/train.py --help`. The work is done by fullrange.cli.train_main."""
import sys

from fullrange.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
