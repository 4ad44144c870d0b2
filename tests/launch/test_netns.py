"""Two hosts made of network namespaces joined by a veth pair (10.200.0.1 <-> 10.200.0.2), one torchrun in each
through `launch/local.sh --nnodes 2`: a run across them has the single-host losses; cutting the link fails both
sides within the configured collective timeout with a clear error; relaunching resumes from the last checkpoint.

Both "hosts" share this machine's hostname, which resolves to 127.0.0.1 on neither of their links: local.sh has to
find each host's address and interface itself (GLOO_SOCKET_IFNAME, --local-addr, the c10d is_host flag).
Skipped, with the reason, where namespaces cannot be made (not root, no iproute2, a kernel or sandbox without
network namespaces).
"""
import os
import subprocess
import time

import pytest

from megacrystal.launch.netns import ADDRS, NetnsUnavailable, two_hosts
from megacrystal.launch.processes import kill_tree

from .conftest import ROOT, STEPS, latest_checkpoint, losses, steps_done

pytestmark = pytest.mark.slow
TIMEOUT_S = 10  # MEGACRYSTAL_DIST_TIMEOUT_S for these runs: how long a collective waits for a lost peer


def _ip(*args) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"ip {' '.join(args)}: {out.stderr.strip()}"


@pytest.fixture
def hosts():
    """Two namespaces and the veth pair between them (megacrystal.launch.netns): yields [(namespace, interface),
    ...]; removes them after."""
    try:
        with two_hosts() as made:
            yield [(host.namespace, host.interface) for host in made]
    except NetnsUnavailable as err:
        pytest.skip(str(err))


def _launch(hosts, config, run, rendezvous: str) -> list[subprocess.Popen]:
    """One `launch/local.sh 1 ... --nnodes 2` per namespace: static (--master-addr) or c10d rendezvous."""
    procs = []
    env = {**os.environ, "MEGACRYSTAL_DIST_TIMEOUT_S": str(TIMEOUT_S), "MEGACRYSTAL_AGENT_GRACE_S": "20"}
    for rank, (ns, _) in enumerate(hosts):
        where = ["--master-addr", ADDRS[0], "--master-port", "29500"] if rendezvous == "static" else \
            ["--rdzv-endpoint", f"{ADDRS[0]}:29400"]
        cmd = ["ip", "netns", "exec", ns, "bash", str(ROOT / "launch" / "local.sh"), "1", str(config),
               "--nnodes", "2", "--node-rank", str(rank), *where,
               "--set", f"run.dir={run}", "--set", f"train.steps={STEPS}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def _finish(procs, timeout: float) -> list[tuple[int, str]]:
    results = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
    finally:
        for proc in procs:
            kill_tree(proc)
    return results


def test_two_hosts_train_like_one_fail_fast_when_cut_and_resume(hosts, synthetic_config, reference_losses,
                                                                tmp_path):
    run = tmp_path / "run"
    (ns_b, if_b) = hosts[1]

    # 1. Static rendezvous across the link; cut it (node b's side) in the middle of the run.
    procs = _launch(hosts, synthetic_config, run, "static")
    try:
        deadline = time.time() + 240
        while steps_done(run) < 4:
            assert all(p.poll() is None for p in procs), _finish(procs, 30)
            assert time.time() < deadline, "the two-host run made no progress"
            time.sleep(0.05)
        _ip("-n", ns_b, "link", "set", if_b, "down")
        cut = time.time()
        results = _finish(procs, TIMEOUT_S + 60)
    finally:
        for proc in procs:
            kill_tree(proc)
    failed_after = time.time() - cut
    for code, out in results:
        assert code == 1, out[-3000:]
        # the one-line error names the cause: a peer stopped answering for the configured timeout
        assert f"a peer stopped answering for {TIMEOUT_S} s (MEGACRYSTAL_DIST_TIMEOUT_S)" in out, out[-3000:]
    assert failed_after < TIMEOUT_S + 15, f"the run took {failed_after:.0f} s to fail after the link was cut"
    assert steps_done(run) < STEPS
    last = latest_checkpoint(run)

    # 2. Link back; relaunch with a c10d rendezvous: both hosts resume from the last checkpoint and finish.
    _ip("-n", ns_b, "link", "set", if_b, "up")
    results = _finish(_launch(hosts, synthetic_config, run, "c10d"), 300)
    for code, out in results:
        assert code == 0, out[-3000:]
    assert f"resumed from {run}/checkpoints/step_{last:09d} at step {last}" in results[0][1]
    assert "GLOO_SOCKET_IFNAME=" + hosts[0][1] in results[0][1]  # found by local.sh, not given

    # 3. Across two hosts, interrupted and resumed: the single-host losses, bit for bit.
    assert losses(run) == reference_losses
