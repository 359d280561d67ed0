"""Entry point: see `python launcher/write_ffcv.py --help`. The work is done by fullrange.cli.write_ffcv_main."""
import sys

from fullrange.cli import write_ffcv_main

if __name__ == "__main__":
    sys.exit(write_ffcv_main())
