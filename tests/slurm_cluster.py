"""A real two-node SLURM cluster on one machine, for tests (needs root; Debian slurm-wlm + munge).

    cluster = SlurmCluster(); cluster.start()
    job = cluster.sbatch(script_path); state = cluster.wait(job)     # "COMPLETED", ...
    cluster.stop()

slurmctld runs in the root network namespace on a private bridge address; each slurmd runs in its own
network namespace (+ UTS namespace: hostname = node name, + mount namespace: its own /etc/hosts), joined
to the bridge by a veth pair. All traffic stays on NET (no default route in the namespaces). The config
is a private file passed through SLURM_CONF (never /etc/slurm), exported to every client call and job.
Anything that is not available (root, `ip netns`, the packages) raises ClusterError: tests fail loudly.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NET = "10.77.78"
BRIDGE = "dpldmbr0"
NS_PREFIX = "dpldm_"
NODES = {"node1": f"{NET}.11", "node2": f"{NET}.12"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


class ClusterError(RuntimeError):
    pass


def _sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


def install() -> None:
    """apt-get install slurm-wlm + munge without starting their services; create a munge key."""
    if os.geteuid() != 0:
        raise ClusterError("the SLURM test cluster needs root (apt-get, network namespaces)")
    if not (shutil.which("slurmctld") and shutil.which("munged")):
        prc = Path("/usr/sbin/policy-rc.d")
        ours = not prc.exists()
        if ours:   # keep package scripts from starting daemons
            prc.write_text("#!/bin/sh\nexit 101\n")
            prc.chmod(0o755)
        try:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            _sh("apt-get", "update", "-q", env=env)
            _sh("apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge", env=env)
        finally:
            if ours:
                prc.unlink()
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o600)


class SlurmCluster:
    def __init__(self, base: str | Path = "/tmp/dpldm-slurm-test"):
        self.base = Path(base)
        self.run = self.base / "run"
        self.conf = self.base / "slurm.conf"
        self.ctl_ip = f"{NET}.1"
        self.ctl_host = socket.gethostname().split(".")[0]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> None:
        install()
        if _sh("ip", "netns", "list", check=False).returncode != 0:
            raise ClusterError("`ip netns` is unavailable: cannot give each slurmd its own network namespace")
        self.stop()                     # leftovers of an earlier, interrupted run
        self.run.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        self._setup_net()
        self._start_munge()
        (self.run / "hosts-ctl").write_text(self._hosts(f"127.0.0.1 localhost {self.ctl_host}"))
        _sh("unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            f"mount --bind {self.run}/hosts-ctl /etc/hosts && exec slurmctld -i", env=self.env)
        self._wait_pid(self.run / "slurmctld.pid", "slurmctld")
        for node in NODES:
            (self.run / f"spool-{node}").mkdir(exist_ok=True)
            (self.run / f"hosts-{node}").write_text(
                self._hosts(f"127.0.0.1 localhost\n{self.ctl_ip} {self.ctl_host}"))
            _sh("nsenter", f"--net=/run/netns/{NS_PREFIX}{node}", "unshare", "--mount", "--uts",
                "--propagation", "private", "--", "sh", "-c",
                f"mount --bind {self.run}/hosts-{node} /etc/hosts && hostname {node} && exec slurmd -N {node}",
                env=self.env)
            self._wait_pid(self.run / f"slurmd-{node}.pid", f"slurmd {node}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = self.scmd("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            if states.count("idle") == len(NODES):
                return
            for node in NODES:
                st = self.scmd("sinfo", "-h", "-N", "-n", node, "-o", "%t", check=False).stdout.strip()
                if st.startswith(("down", "drain", "drng")):
                    self.scmd("scontrol", "update", f"nodename={node}", "state=resume", check=False)
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout:.0f} s: {self.scmd('sinfo', '-N', check=False).stdout}"
                           f"\n{self._tail('slurmctld.log')}")

    def stop(self) -> None:
        if self.conf.exists():
            self.scmd("scancel", "--user=root", check=False)
            time.sleep(0.5)
        for node in NODES:
            self._stop_pid(self.run / f"slurmd-{node}.pid")
        self._stop_pid(self.run / "slurmctld.pid")
        for node in NODES:
            ns = f"{NS_PREFIX}{node}"
            pids = _sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:    # job steps left in our namespaces only
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _sh("ip", "link", "del", f"dpv_{node}", check=False)
            _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)
        if self._started_munge or (self.run / "munged.started.pid").exists():
            self._stop_pid(self.run / "munged.started.pid")
            self._started_munge = False
        shutil.rmtree(self.run / "ctld", ignore_errors=True)   # no stale job state next time

    # -- use ---------------------------------------------------------------------------------
    def scmd(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sbatch, squeue, scontrol, ...) against this cluster."""
        return _sh(*cmd, check=check, env=self.env)

    def sbatch(self, script: str | Path) -> str:
        return self.scmd("sbatch", "--parsable", str(script)).stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        out = self.scmd("scontrol", "show", "job", job, check=False).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job: str, timeout: float = 300, until=TERMINAL) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            st = self.state(job)
            if st in until:
                return st
            time.sleep(0.5)
        raise ClusterError(f"job {job} still {self.state(job)} after {timeout:.0f} s")

    # -- internals ---------------------------------------------------------------------------
    def _hosts(self, head: str) -> str:
        return head + "\n" + "".join(f"{ip} {n}\n" for n, ip in NODES.items())

    def _write_conf(self) -> None:
        r = self.run
        lines = [
            "ClusterName=dpldmtest", f"SlurmctldHost={self.ctl_host}({self.ctl_ip})",
            "SlurmUser=root", "SlurmdUser=root", "SlurmctldPort=6827", "SlurmdPort=6828",
            # cred_expire: a requeued job may start again only after its old credential expires (default
            # 120 s); forcing an earlier start makes slurmd refuse the launch as revoked and the job FAILs.
            "AuthType=auth/munge", "AuthInfo=cred_expire=10", "CredType=cred/munge", f"StateSaveLocation={r}/ctld",
            f"SlurmdSpoolDir={r}/spool-%n", f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid", f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log", "SlurmctldDebug=info", "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",       # no cgroups here
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "MailProg=/bin/true", "SwitchType=switch/none", "MpiDefault=none",
            "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=10",
            "MinJobAge=600", "Waittime=0", "JobRequeue=1",
        ]
        cpus = os.cpu_count() or 1
        lines += [f"NodeName={n} NodeAddr={ip} NodeHostname={n} CPUs={cpus} RealMemory=1000 State=UNKNOWN"
                  for n, ip in NODES.items()]
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.parent.mkdir(parents=True, exist_ok=True)
        self.conf.write_text("\n".join(lines) + "\n")

    def _setup_net(self) -> None:
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.ctl_ip}/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for node, ip in NODES.items():
            ns, host_end, ns_end = f"{NS_PREFIX}{node}", f"dpv_{node}", f"dpp_{node}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _sh("ip", "link", "set", ns_end, "netns", ns)
            _sh("ip", "-n", ns, "link", "set", ns_end, "name", "eth0")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "link", "set", host_end, "master", BRIDGE)
            _sh("ip", "link", "set", host_end, "up")

    def _start_munge(self) -> None:
        probe = subprocess.run("munge -n | unmunge", shell=True, capture_output=True)
        if Path("/run/munge/munge.socket.2").exists() and probe.returncode == 0:
            return                                               # someone's munged: reuse, don't own
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        _sh("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        self._wait_pid(Path("/run/munge/munged.pid"), "munged")
        shutil.copy("/run/munge/munged.pid", self.run / "munged.started.pid")
        self._started_munge = True

    def _wait_pid(self, pidfile: Path, what: str, timeout: float = 15) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, 0)
                return pid
            except (FileNotFoundError, ValueError, ProcessLookupError):
                time.sleep(0.1)
        log = what.split()[0] + ("-" + what.split()[1] if " " in what else "") + ".log"
        raise ClusterError(f"{what} did not start within {timeout:.0f} s\n{self._tail(log)}")

    def _stop_pid(self, pidfile: Path) -> None:
        try:
            pid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pidfile.unlink(missing_ok=True)

    def tail_logs(self, n: int = 15) -> str:
        """The last lines of the controller's and every slurmd's log, for a failing test's message."""
        names = ["slurmctld.log"] + [f"slurmd-{node}.log" for node in NODES]
        return "\n".join(f"--- {name}\n{self._tail(name, n)}" for name in names)

    def _tail(self, name: str, n: int = 20) -> str:
        path = self.run / name
        return "\n".join(path.read_text().splitlines()[-n:]) if path.exists() else f"({path} missing)"
