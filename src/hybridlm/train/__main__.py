"""`python -m hybridlm.train` (what torchrun launches): the same flags as `hybridlm train`."""

import argparse
import sys

from hybridlm.errors import run_reporting_errors
from hybridlm.train.command import add_train_arguments, run_train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridlm.train")
    add_train_arguments(parser)
    return run_reporting_errors(run_train_command, parser.parse_args(argv), "train")


if __name__ == "__main__":
    sys.exit(main())
