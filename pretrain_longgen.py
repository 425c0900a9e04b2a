"""LongGen length-extension training on Megatron-Core. See README.md and --help."""

import sys

from megatron_longgen.train import command
from megatron_longgen.utils.cli import run_main

if __name__ == "__main__":  # required: checkpoint saving starts worker processes
    sys.exit(run_main(command, sys.argv[1:]))
