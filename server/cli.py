"""`logitstore-server`: placeholder until the service lands."""

import sys


def main() -> int:
    print("logitstore-server: not yet available (the service is tracked in issue 7)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
