"""`python -m fullrange.cache_teacher` (from an installed package): the same as launcher/cache_teacher.py in a clone,
e.g. `accelerate launch -m fullrange.cache_teacher ...`. See fullrange.cli.cache_teacher_main."""
import sys

from fullrange.cli import cache_teacher_main

if __name__ == "__main__":
    sys.exit(cache_teacher_main())
