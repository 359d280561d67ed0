"""Entry point: see `python launcher/sweep.py --help`. The work is done by fullrange.cli.sweep_main."""
import sys

from fullrange.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
