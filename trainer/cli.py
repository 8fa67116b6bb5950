"""`logitstore-train`: placeholder until the training loop lands."""

import sys


def main() -> int:
    print("logitstore-train: not yet available (the training loop is tracked in issue 6)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
