"""A trainer process under `python -m megacrystal.launch.torchrun`: `megacrystal ARGS` with two additions.

SIGUSR1, SIGTERM and SIGINT are ignored until the trainer installs its stop handlers (train.signals), so a stop
request that arrives while this rank is still importing cannot kill it (their default action); the launcher
repeats the request until the trainer handles it. Uncaught errors are recorded for torchrun's failure report, so
the launcher can name the rank and the error in one line.
"""
import signal
import sys

for _signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):  # first, before the slow imports
    signal.signal(_signum, signal.SIG_IGN)


def main() -> int:
    """Run the megacrystal command line given after the module name."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from ..cli import main as cli_main

    if sys.argv[1:2] != ["train"]:  # only `train` takes stop signals over; others keep the default actions
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    return record(cli_main)(sys.argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
