"""``python -m sparge`` / ``sparge-bench``: the benchmark CLI (see :mod:`sparge.bench`)."""

import sys


def main() -> int:
    from sparge.bench import main as bench_main

    return bench_main()


if __name__ == "__main__":
    sys.exit(main())
