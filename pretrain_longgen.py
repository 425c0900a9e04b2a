"""LongGen length-extension training on Megatron-Core. See README.md and --help."""

import sys

from megatron_longgen.train import cli_main

if __name__ == "__main__":  # required: checkpoint saving starts worker processes
    sys.exit(cli_main(sys.argv[1:]))
