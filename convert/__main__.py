"""`python -m convert` and the `mixtral-convert` console script.

SIGINT and SIGTERM are caught before anything heavy is imported. Until a command's run begins nothing has been
done, so a signal then ends the process at once with the one interrupt line: raising KeyboardInterrupt inside
an import instead can break it (numpy turns one into an ImportError about a bad install).
"""

import os
import signal
import sys


def _before_the_run(signum: int, _frame: object) -> None:
    sys.stderr.write("mixtral-convert: interrupted; nothing was done\n")
    sys.stderr.flush()
    os._exit(130)


def one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread per core when it is loaded, and they spin before they sleep; the converter
    never calls BLAS, so those threads only take a core from the start of a run. A user's own setting stands."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    signal.signal(signal.SIGINT, _before_the_run)
    signal.signal(signal.SIGTERM, _before_the_run)
    one_blas_thread()
    from convert.cli import entry

    entry()


if __name__ == "__main__":
    main()
