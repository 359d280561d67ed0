"""`python -m fullrange.write_ffcv` (from an installed package): the same as launcher/write_ffcv.py in a clone,
e.g. `accelerate launch -m fullrange.write_ffcv ...`. See fullrange.cli.write_ffcv_main."""
import sys

from fullrange.cli import write_ffcv_main

if __name__ == "__main__":
    sys.exit(write_ffcv_main())
