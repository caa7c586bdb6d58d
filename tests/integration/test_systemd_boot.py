"""systemd/palsd.service under a real systemd (the OS's, 252 on Debian 12) booted as PID 1 of a
private PID + mount namespace, against a real `palsd sim-host`: Type=notify readiness, the
watchdog killing a wedged (SIGSTOPped) daemon, ExecStopPost putting every limit back, and
LimitNOFILE in force.

Safety (systemd shares this machine's filesystem): before systemd starts, the namespace mounts
private tmpfs on /tmp, /var/tmp and /run and masks every systemd-tmpfiles unit (in
/run/systemd/system.control, which outranks /etc), and systemd boots only palsd-test.target
(DefaultDependencies=no). It runs in a cgroup subtree of its own, with resource accounting off,
so it creates nothing in the machine's controllers beyond that subtree, which is removed after.
Test files live in a directory created under /var/lib (/tmp is private in the namespace), and a
canary file in the real /tmp is checked at the end. On a machine that itself runs systemd as PID 1
the test skips (a second systemd would need a delegated cgroup subtree, not set up here), and so
it does when the checkout, its virtualenv or the interpreter lies under /tmp, /var/tmp or /run,
which the namespace mounts afresh (systemd then fails to start palsd with 203/EXEC).

What the test copy of the unit changes, and why (everything else is the shipped unit):
- the Exec paths point at this checkout's palsd and the test's config;
- User=/Group= are reset: this machine has no palsd user (sysusers would add one for real);
- StateDirectory=/ConfigurationDirectory= are reset and the test directory is a ReadWritePath:
  they would create /var/lib/palsd and /etc/palsd on this machine's real filesystem;
- DevicePolicy=/DeviceAllow= are reset: they need the devices cgroup controller, which belongs
  to this machine (and there is no NVIDIA device here anyway);
- Restart=no, so the state after the watchdog kill (limits restored) can be observed;
- stdout goes to a file: there is no journald in the namespace;
- where this machine's Python, the virtualenv or the checkout lives under /root or /home,
  ProtectHome=yes becomes ProtectHome=tmpfs with those paths bound back read-only: homes stay
  hidden otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.integration.procs import gpu_limits, sim_host, wait_until

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "palsd.service"
SYSTEMD = Path("/lib/systemd/systemd")
INSTALLED_BIN = "/opt/palsd/bin/palsd"
TMPFILES_UNITS = [
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-setup-dev-early.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
]

BOOT = """#!/bin/bash
# PID 1 of a fresh PID + mount namespace: make it private, then become systemd.
set -eu
WORK=$1; NAME=$2
mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp
mount -t tmpfs -o mode=1777,size=64m tmpfs /var/tmp
mount -t tmpfs -o mode=0755,size=64m tmpfs /run
mkdir -p /run/systemd/system.control /run/systemd/system /run/systemd/system.conf.d
for u in {masked}; do ln -s /dev/null /run/systemd/system.control/$u; done
cp -r "$WORK"/units/. /run/systemd/system/
cp "$WORK"/system.conf /run/systemd/system.conf.d/palsd-test.conf
if [ -f /sys/fs/cgroup/cgroup.procs ]; then  # cgroup v2 only: one subtree
  mkdir -p /sys/fs/cgroup/$NAME && echo 0 > /sys/fs/cgroup/$NAME/cgroup.procs
else  # v1 or hybrid: the systemd hierarchy, and the unified one if mounted
  for h in systemd unified; do
    if [ -d /sys/fs/cgroup/$h ]; then
      mkdir -p /sys/fs/cgroup/$h/$NAME && echo 0 > /sys/fs/cgroup/$h/$NAME/cgroup.procs
    fi
  done
fi
exec env -i container=palsd-test PATH=/usr/sbin:/usr/bin:/sbin:/bin \\
  {systemd} --system --unit=palsd-test.target --log-target=console --log-level=info \\
  </dev/null >"$WORK/systemd.log" 2>&1
"""

SYSTEM_CONF = """[Manager]
DefaultTasksAccounting=no
DefaultMemoryAccounting=no
DefaultCPUAccounting=no
DefaultIOAccounting=no
DefaultIPAccounting=no
DefaultBlockIOAccounting=no
"""

TARGET = """[Unit]
Description=palsd under test
DefaultDependencies=no
Wants=palsd.service
"""


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create PID and mount namespaces"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} (util-linux) is not installed"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is not installed (apt-get install systemd)"
    if Path("/run/systemd/system").is_dir():
        # The machine itself runs systemd, which owns the cgroup tree: a second one would need a
        # delegated subtree (systemd-run --scope -p Delegate=yes, unshare --cgroup); not done.
        return "this machine is booted with systemd; the test boots its own only where it is not"
    if (
        not Path("/sys/fs/cgroup/systemd").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.procs").exists()
    ):
        return "no cgroup hierarchy to give the namespaced systemd a subtree of"
    for path in _runs_from():
        if path.parts[:2] in (("/", "tmp"), ("/", "run")) or path.parts[:3] == ("/", "var", "tmp"):
            return (
                f"{path} is under /tmp, /var/tmp or /run, which the namespace mounts afresh "
                "(and the unit's PrivateTmp= hides): run the tests from a checkout elsewhere"
            )
    return None


def _runs_from() -> list[Path]:
    """What the unit runs from: the interpreter (pyenv), the virtualenv and the checkout that
    the editable install points at."""
    return sorted({Path(p).resolve() for p in (sys.base_prefix, sys.prefix, ROOT)})


def _drop_in(work: Path) -> str:
    home = ""
    # What the unit runs from may sit under a home directory (a clone in /root, say), which
    # ProtectHome=yes would hide: then keep homes hidden behind a tmpfs and bind only those
    # paths back, read-only.
    in_homes = [str(p) for p in _runs_from() if p.parts[:2] in (("/", "root"), ("/", "home"))]
    if in_homes:
        home = f"ProtectHome=tmpfs\nBindReadOnlyPaths={' '.join(in_homes)}\n"
    return f"""[Unit]
DefaultDependencies=no
[Service]
{home}User=
Group=
StateDirectory=
ConfigurationDirectory=
ReadWritePaths={work}
DevicePolicy=auto
DeviceAllow=
Restart=no
StandardOutput=append:{work}/palsd.log
StandardError=inherit
"""


class Namespace:
    """One booted systemd; commands run inside its mount and PID namespaces."""

    def __init__(self, unshare: subprocess.Popen[bytes], work: Path) -> None:
        self.unshare, self.work = unshare, work
        self.pid = wait_until(self._child, 30, "systemd to start in the namespace")

    def _child(self) -> int | None:
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.unshare.pid)], capture_output=True, text=True
        ).stdout.split()
        return int(out[0]) if out else None

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        proc = self.run("systemctl", "show", unit, "-p", ",".join(props))
        return dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)

    def logs(self) -> str:
        status = self.run("systemctl", "status", "--no-pager", "-l", "-n", "30", "palsd")
        parts = [f"--- systemctl status palsd ---\n{status.stdout}{status.stderr}"]
        for name in ("systemd.log", "palsd.log"):
            path = self.work / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text()[-3000:]}")
        return "\n".join(parts)


@contextmanager
def booted(work: Path) -> Iterator[Namespace]:
    name = f"palsd-test-{uuid.uuid4().hex[:8]}"
    boot = work / "boot.sh"
    boot.write_text(
        BOOT.replace("{masked}", " ".join(TMPFILES_UNITS)).replace("{systemd}", str(SYSTEMD))
    )
    boot.chmod(0o755)
    (work / "system.conf").write_text(SYSTEM_CONF)
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc",
         str(boot), str(work), name],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ns = None
    try:
        ns = Namespace(unshare, work)
        yield ns
    finally:
        # PID 1 ignores SIGTERM; killing it ends every process of the namespace with it.
        if ns is not None:
            os.kill(ns.pid, signal.SIGKILL)
        try:
            unshare.wait(timeout=30)
        except subprocess.TimeoutExpired:
            unshare.kill()
            unshare.wait()
        for hierarchy in ("systemd", "unified", ""):
            top = Path("/sys/fs/cgroup") / hierarchy / name
            if top.is_dir():
                for path in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if path.is_dir():
                        _rmdir_when_empty(path)
                _rmdir_when_empty(top)


def _rmdir_when_empty(path: Path) -> None:
    for _ in range(50):  # a cgroup is removable once its last process is reaped
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
def test_unit_under_real_systemd_notify_watchdog_restore_and_nofile(tmp_path: Path) -> None:
    canary = Path(tempfile.mkstemp(prefix="palsd-systemd-canary-", dir="/tmp")[1])
    canary.write_text("still here")
    work = Path(tempfile.mkdtemp(prefix="palsd-systemd-test.", dir="/var/lib"))
    try:
        with sim_host(tmp_path, gpus=2, servers=1) as sim:
            before = gpu_limits(sim)
            budget_w = 0.6 * sum(before.values())
            config = work / "palsd.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "control": {"period_s": 0.5},
                        "gpu": {"backend": "sim", "sim_url": sim["url"]},
                        "budget": {"default_w": budget_w},
                        "servers": [
                            {"name": s["name"], "url": s["url"], "gpus": s["gpus"]}
                            for s in sim["servers"]
                        ],
                        "api": {"socket": "/run/palsd/palsd.sock", "admin_group": None},
                        "metrics": {"host": "127.0.0.1", "port": 0},
                        "state": {"dir": str(work / "state")},
                        "logging": {"format": "json", "level": "info"},
                    }
                )
            )
            palsd_bin = str(Path(sys.executable).parent / "palsd")
            units = work / "units"
            (units / "palsd.service.d").mkdir(parents=True)
            (units / "palsd.service").write_text(
                UNIT.read_text()
                .replace(INSTALLED_BIN, palsd_bin)
                .replace("/etc/palsd/palsd.yaml", str(config))
            )
            (units / "palsd.service.d" / "test.conf").write_text(_drop_in(work))
            (units / "palsd-test.target").write_text(TARGET)

            with booted(work) as ns:
                # Type=notify: "active" only once palsd said READY=1 after its first tick.
                props = wait_until(
                    lambda: (
                        (p := ns.show("palsd", "ActiveState", "SubState", "MainPID"))
                        and p.get("ActiveState") in ("active", "failed")
                        and p
                    ),
                    90,
                    "palsd.service active",
                )
                assert props["ActiveState"] == "active", ns.logs()
                assert props["SubState"] == "running"
                status = ns.show("palsd", "StatusText", "Type", "WatchdogUSec")
                assert status["Type"] == "notify" and "budget" in status["StatusText"], status
                assert status["WatchdogUSec"] == "10s"
                wait_until(lambda: sum(gpu_limits(sim).values()) <= budget_w, 30, "limits lowered")
                main_pid = props["MainPID"]
                limits = ns.run("cat", f"/proc/{main_pid}/limits").stdout
                nofile = next(ln for ln in limits.splitlines() if ln.startswith("Max open files"))
                assert nofile.split()[3:5] == ["4096", "4096"], nofile

                # Wedge it: a stopped daemon feeds no watchdog; systemd kills it, then runs
                # ExecStopPost (`palsd restore`), which puts every original limit back.
                assert ns.run("kill", "-STOP", main_pid).returncode == 0
                result = wait_until(
                    lambda: (
                        (p := ns.show("palsd", "ActiveState", "Result"))
                        and p.get("ActiveState") in ("failed", "inactive")
                        and p
                    ),
                    90,
                    "the watchdog to kill palsd",
                )
                assert result["Result"] == "watchdog", (result, ns.logs())
                wait_until(lambda: gpu_limits(sim) == before, 60, "ExecStopPost restore")
                assert not (work / "state" / "originals.json").exists()
                log = (work / "palsd.log").read_text()
                assert '"restored"' in log or "power_limit_restored" in log, log[-2000:]
        assert canary.read_text() == "still here", "the real /tmp was touched"
    finally:
        canary.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)


def test_boot_script_masks_tmpfiles_and_privatises_tmp_before_systemd() -> None:
    # The safety steps come first and systemd last: a reordering would let systemd-tmpfiles
    # loose on the machine's real /tmp.
    lines = [ln.strip() for ln in BOOT.splitlines()]
    order = [
        next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
        for prefix in (
            "mount -t tmpfs -o mode=1777,size=64m tmpfs /tmp",
            "mount -t tmpfs -o mode=1777,size=64m tmpfs /var/tmp",
            "mount -t tmpfs -o mode=0755,size=64m tmpfs /run",
            "for u in {masked}",
            "exec env -i",
        )
    ]
    assert order == sorted(order)
    assert set(TMPFILES_UNITS) >= {
        u.name for u in Path("/lib/systemd/system").glob("systemd-tmpfiles*") if u.is_file()
    }
    assert json.dumps(TARGET).count("DefaultDependencies=no") == 1
