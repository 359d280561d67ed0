"""Entry point: see `python launcher/convert_official.py --help`. The work is done by fullrange.cli.convert_official_main."""
import sys

from fullrange.cli import convert_official_main

if __name__ == "__main__":
    sys.exit(convert_official_main())
