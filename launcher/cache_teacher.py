"""Entry point: see `python launcher/cache_teacher.py --help`. The work is done by fullrange.cli.cache_teacher_main."""
import sys

from fullrange.cli import cache_teacher_main

if __name__ == "__main__":
    sys.exit(cache_teacher_main())
