"""The peak memory a run reports is its own, not that of the process that launched it."""
import subprocess
import sys


def test_peak_memory_is_the_process_own_not_its_launchers():
    launcher = bytearray(600 * 2**20)  # the launcher grows to 600 MB (as the bench does after a baseline)...
    launcher[::4096] = b"\1" * len(launcher[::4096])
    code = ("import resource; from megacrystal.train.loop import _peak_memory_mb; "
            "print(_peak_memory_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    ours, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                check=True).stdout.split())
    assert inherited > 600  # ...and Linux carries that peak into ru_maxrss of what it forks and execs
    assert ours < 500  # a python importing torch, far from 600 MB
    del launcher
