"""LongGen length-extension training on Megatron-Core. See README.md and --help."""

import sys

from megatron_longgen.utils.accelerators import quiet_fallback_warnings

quiet_fallback_warnings()  # before Megatron-Core is imported; the trainer's banner names them

from megatron_longgen.train import cli_main  # noqa: E402

if __name__ == "__main__":  # required: checkpoint saving starts worker processes
    sys.exit(cli_main(sys.argv[1:]))
