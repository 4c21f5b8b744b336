"""``python -m megatron_irl <command>``: the ``megatron-irl`` command line (commands/).

The guard matters: checkpoint saving starts helper processes that re-import ``__main__``.
"""

import sys

from megatron_irl.commands import main

if __name__ == "__main__":
    sys.exit(main())
