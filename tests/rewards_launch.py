"""Run ``megatron-irl rewards`` several times in one launch (one set of processes).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 python tests/rewards_launch.py \
        '{"ports": [p1, p2], "commands": [["--load", "a", ...], ["--load", "b", ...]]}'

Each argument list is one command line of ``megatron-irl rewards``; each run sets up and
tears down its own process groups, as the command does, rendezvousing on its own port
(``MASTER_PORT`` = the run's entry of "ports"): a second process group on the port of a
destroyed one would find the first one's keys in the store and wait forever. Exits with
the first non-zero status. Tests use it to check several checkpoints for the cost of one
launch.
"""

import json
import os
import sys

from megatron_irl.commands.rewards import main

if __name__ == "__main__":
    runs = json.loads(sys.argv[1])
    for port, argv in zip(runs["ports"], runs["commands"]):
        os.environ["MASTER_PORT"] = str(port)
        status = main(argv)
        if status:
            sys.exit(status)
