"""`python -m hybridlm.train` (what torchrun launches): the same flags as `hybridlm train`."""

import argparse
import sys

from hybridlm.cli import add_train_arguments, run_train_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridlm.train")
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run_train_command(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"hybridlm train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
