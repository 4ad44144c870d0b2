"""Two "hosts" on one machine: two network namespaces joined by a veth pair, optionally rate-limited by `tc tbf`.

Used by the multi-node tests (tests/launch/test_netns.py) and `megacrystal bench --link-rates`. It needs root,
iproute2 (`ip`, `tc`) and a kernel that lets us make network namespaces; where one of those is missing,
`two_hosts()` raises NetnsUnavailable, whose message is one line that says which.

    with two_hosts() as hosts:            # hosts[0] is 10.200.0.1, hosts[1] 10.200.0.2
        set_rate(hosts, 50)               # 50 Mbit/s each way (tbf on both ends' egress)
        subprocess.run(hosts[1].command(["python", "-c", "..."]))
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from ..config import ConfigError

ADDRS = ("10.200.0.1", "10.200.0.2")
# tbf's bucket: large enough for one 64 KB GSO packet (a smaller one makes tbf split every TSO packet), small
# against the megabytes a gradient all-reduce moves (it is what leaves at veth speed after an idle spell).
TBF_BURST_BYTES = 64 * 1024
# tbf's queue, in time at the rate: long enough that TCP's window, not tbf drops, is what the sender waits on.
TBF_LATENCY_MS = 400


class NetnsError(ConfigError):
    """Setting up, throttling or tearing down the namespaces failed; printed by the CLI as one line."""


class NetnsUnavailable(NetnsError):
    """This machine cannot make network namespaces (not root, no iproute2, or the kernel/sandbox forbids it)."""


@dataclass(frozen=True)
class Host:
    namespace: str
    interface: str  # this host's end of the veth pair
    address: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {out.stderr.strip() or f'exit {out.returncode}'}")
    return out


def check_available() -> None:
    """Raise NetnsUnavailable unless we are root with iproute2 (the namespaces themselves are tried by two_hosts)."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")
    for tool in ("ip", "tc"):
        if not shutil.which(tool):
            raise NetnsUnavailable(f"iproute2 (the {tool} command) is not installed")


@contextmanager
def two_hosts(tag: str | None = None) -> Iterator[list[Host]]:
    """Create two namespaces and the veth pair between them (addresses ADDRS, /24); always remove them after.

    `tag` makes the names unique (default: this process id). SIGTERM is turned into SystemExit while they exist,
    so a terminated caller still removes them.
    """
    check_available()
    tag = tag or f"{os.getpid() % 100000}"
    hosts = [Host(f"mc{tag}{side}", f"mcv{tag}{side}", addr) for side, addr in zip("ab", ADDRS)]
    made: list[str] = []
    previous = _exit_on_sigterm()
    try:
        for host in hosts:
            out = _run(["ip", "netns", "add", host.namespace], check=False)
            if out.returncode != 0:
                raise NetnsUnavailable(f"cannot create a network namespace here: {out.stderr.strip()}")
            made.append(host.namespace)
        a, b = hosts
        out = _run(["ip", "link", "add", a.interface, "netns", a.namespace, "type", "veth",
                    "peer", "name", b.interface, "netns", b.namespace], check=False)
        if out.returncode != 0:
            raise NetnsUnavailable(f"cannot create a veth pair between namespaces here: {out.stderr.strip()}")
        for host in hosts:
            _run(["ip", "-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.interface])
            _run(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
            _run(["ip", "-n", host.namespace, "link", "set", host.interface, "up"])
        yield hosts
    finally:
        for namespace in made:
            _remove(namespace)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm():
    """Make SIGTERM raise SystemExit (so `finally` runs); return the previous handler, or None off the main thread."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None


def _remove(namespace: str) -> None:
    """Kill what still runs inside (only our own children can: we made the namespace), then delete it.

    A namespace lives on while a process is in it, and with it the veth pair; deleting it takes the pair along.
    """
    pids = _run(["ip", "netns", "pids", namespace], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    _run(["ip", "netns", "del", namespace], check=False)


def set_rate(hosts: list[Host], mbit: float | None) -> None:
    """Throttle both directions of the link to `mbit` Mbit/s (None: remove the throttle).

    tbf on each end's egress: every byte a host sends passes its own end's tbf once. tbf counts a packet's
    length at layer 2 (Ethernet header + IP + TCP headers + payload; no preamble or FCS on a veth), and tc's
    "mbit" is 10^6 bit/s. The rate is given to tc in bit/s so no unit is rounded.
    """
    for host in hosts:
        if mbit is None:
            _run(["tc", "-n", host.namespace, "qdisc", "del", "dev", host.interface, "root"],
                 check=False)  # absent already: fine
            continue
        bits = int(round(mbit * 1e6))
        limit = int(bits / 8 * TBF_LATENCY_MS / 1000) + TBF_BURST_BYTES
        out = _run(["tc", "-n", host.namespace, "qdisc", "replace", "dev", host.interface, "root", "tbf",
                    "rate", f"{bits}bit", "burst", str(TBF_BURST_BYTES), "limit", str(limit)], check=False)
        if out.returncode != 0:
            raise NetnsUnavailable(f"cannot throttle the link with tc tbf here: {out.stderr.strip()}")


def link_stats(hosts: list[Host]) -> list[dict]:
    """What each end's tbf has sent so far: {'bytes', 'packets', 'dropped'} (layer-2 bytes, as tbf counts them)."""
    stats = []
    for host in hosts:
        out = _run(["tc", "-n", host.namespace, "-s", "qdisc", "show", "dev", host.interface])
        words = out.stdout.split()
        try:
            sent = words.index("Sent")
            dropped = words.index("(dropped")
            stats.append({"bytes": int(words[sent + 1]), "packets": int(words[sent + 3]),
                          "dropped": int(words[dropped + 1].rstrip(","))})
        except (ValueError, IndexError):
            raise NetnsError(f"cannot read tc statistics of {host.interface}: {out.stdout.strip()!r}") from None
    return stats
