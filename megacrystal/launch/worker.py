"""A trainer process under `python -m megacrystal.launch.torchrun`: `megacrystal ARGS` with two additions.

SIGUSR1 is ignored until the trainer installs its stop handler (checkpoint.stop_signals), so a stop request that
arrives while this rank is still importing or loading cannot kill it (SIGUSR1's default action); the launcher
repeats the request until the trainer handles it. Uncaught errors are recorded for torchrun's failure report, so
the launcher can name the rank and the error in one line.
"""
import signal
import sys

signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # first, before the slow imports


def main() -> int:
    """Run the megacrystal command line given after the module name."""
    from torch.distributed.elastic.multiprocessing.errors import record

    from ..cli import main as cli_main

    return record(cli_main)(sys.argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
