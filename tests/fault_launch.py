"""launcher/train.py (or, with `cache` first, launcher/cache_teacher.py) with the fault of
FULLRANGE_FAULT injected through the library's hooks (tests/faults.py)."""
import sys

from faults import fault_hooks
from fullrange.cli import cache_teacher_main, train_main

if __name__ == "__main__":
    if sys.argv[1:2] == ["cache"]:
        sys.exit(cache_teacher_main(sys.argv[2:], hooks=fault_hooks))
    sys.exit(train_main(sys.argv[1:], hooks=fault_hooks))
