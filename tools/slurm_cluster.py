"""A single-node SLURM cluster on this machine, for the SLURM tests (tests/test_slurm.py) and
for trying the launcher by hand: munged, slurmctld and slurmd started by hand (as root) with
every file under one directory, stopped by their PIDs.

    python tools/slurm_cluster.py start    # idempotent; prints SLURM_CONF=... and PATH=...
    python tools/slurm_cluster.py status   # the daemons' PIDs and `sinfo`; exit 1 when down
    python tools/slurm_cluster.py stop     # SIGTERM to each daemon's PID, then the directory stays
    eval "$(python tools/slurm_cluster.py start)"; export SLURM_CONF PATH

Needs the Debian packages ``slurmctld slurmd slurm-client munge`` (SLURM 22.05 is what it was
written against) and root (the daemons run as root: ``SlurmUser=root``). The directory is
``$IMGCLS_SLURM_DIR``, else /tmp/imgcls-slurm. The node is this machine (its CPUs and a bit less
memory than it has), one partition ``debug`` whose CPUs up to 4 jobs may share (the tests'
jobs mostly wait: they run side by side), no accounting, jobs requeued on request
(``JobRequeue=1``). Without accounting ``sacct`` fails, and submitit (the launcher) would
never see a job end that wrote no result (a job stopped by a signal): the ``bin/sacct`` written
here answers submitit's question (``sacct -o JobID,State,NodeList --parsable2 -j IDS``) from
``scontrol show job``, which keeps finished jobs for ``MinJobAge`` (an hour); ``start``
prints the PATH that puts it first.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CTLD_PORT, SLURMD_PORT = 6917, 6918  # not the defaults (6817, 6818): a real cluster's daemons may run here

SACCT_SHIM = r"""#!/bin/sh
# sacct for a SLURM without accounting (tools/slurm_cluster.py): only what submitit asks,
# `sacct -o JobID,State,NodeList --parsable2 -j ID[,ID...]`, answered from `scontrol show job`.
ids=""
while [ $# -gt 0 ]; do
  case "$1" in
    -j|--jobs) ids="$2"; shift 2 ;;
    -j*) ids="${1#-j}"; shift ;;
    --jobs=*) ids="${1#--jobs=}"; shift ;;
    *) shift ;;
  esac
done
echo "JobID|State|NodeList"
for id in $(echo "$ids" | tr ',' ' '); do
  scontrol -o show job "$id" 2>/dev/null | awk '{
    for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = substr($i, length(kv[1]) + 2) }
    id = v["JobId"]
    if (v["ArrayTaskId"] != "") {
      t = v["ArrayTaskId"]; id = v["ArrayJobId"] "_" ((t ~ /[-,]/) ? "[" t "]" : t)
    }
    nodes = v["NodeList"]; if (nodes == "(null)") nodes = "None assigned"
    print id "|" v["JobState"] "|" nodes
    delete v
  }'
done
"""


def cluster_dir() -> Path:
    return Path(os.environ.get("IMGCLS_SLURM_DIR", "/tmp/imgcls-slurm"))


def missing_programs() -> list[str]:
    need = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "srun", "scontrol", "squeue")
    found = {p: shutil.which(p) or shutil.which(p, path="/usr/sbin:/sbin") for p in need}
    return [p for p, where in found.items() if where is None]


def program(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


def node_memory_mb() -> int:
    """What slurmd may hand out: MemTotal less 1 GiB (slurmd refuses a node that has less than it says)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return max(512, int(line.split()[1]) // 1024 - 1024)
    return 1024


def slurm_conf(d: Path) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    return f"""# written by tools/slurm_cluster.py: a single-node cluster, everything under {d}
ClusterName=imgcls
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={CTLD_PORT}
SlurmdPort={SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
JobRequeue=1
MinJobAge=3600
KillWait=30
ReturnToService=2
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={node_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    return pid


def pids(d: Path) -> dict[str, int | None]:
    return {
        "munged": read_pid(d / "munge" / "munged.pid"),
        "slurmctld": read_pid(d / "slurmctld.pid"),
        "slurmd": read_pid(d / "slurmd.pid"),
    }


def env_lines(d: Path) -> str:
    return f"SLURM_CONF={d / 'slurm.conf'}\nPATH={d / 'bin'}:{os.environ.get('PATH', '')}\n"


def environ(d: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["SLURM_CONF"] = str(d / "slurm.conf")
    env["PATH"] = f"{d / 'bin'}:{env.get('PATH', '')}"
    return env


def node_state(d: Path) -> str | None:
    try:
        out = subprocess.run(
            [program("sinfo"), "-h", "-o", "%T"], env=environ(d), capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def wait_for(check, what: str, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise SystemExit(f"error: {what} did not come up within {seconds:.0f} s (logs under {cluster_dir() / 'log'})")


def start(d: Path) -> int:
    missing = missing_programs()
    if missing:
        print(f"error: not installed: {', '.join(missing)} (apt-get install {' '.join(PACKAGES)})", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("error: the daemons run as root here (SlurmUser=root); run as root", file=sys.stderr)
        return 1
    running = pids(d)
    if all(running.values()) and (node_state(d) or "").rstrip("*") in ("idle", "mixed", "allocated"):
        sys.stdout.write(env_lines(d))  # already up
        return 0
    stop(d, quiet=True)
    for sub in ("munge", "state", "spool", "log", "bin"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(d / "munge", 0o700)
    key = d / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
    (d / "slurm.conf").write_text(slurm_conf(d))
    shim = d / "bin" / "sacct"
    shim.write_text(SACCT_SHIM)
    shim.chmod(0o755)
    env = environ(d)
    m = d / "munge"
    subprocess.run(
        [
            program("munged"),
            f"--socket={m / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={m / 'munged.pid'}",
            f"--seed-file={m / 'munged.seed'}",
            f"--log-file={d / 'log' / 'munged.log'}",
            "--force",
        ],
        check=True,
        env=env,
    )
    wait_for(lambda: read_pid(m / "munged.pid") and (m / "munge.socket").exists(), "munged")
    conf = str(d / "slurm.conf")
    subprocess.run([program("slurmctld"), "-f", conf], check=True, env=env)
    wait_for(lambda: read_pid(d / "slurmctld.pid"), "slurmctld")
    subprocess.run([program("slurmd"), "-f", conf], check=True, env=env)
    wait_for(lambda: read_pid(d / "slurmd.pid"), "slurmd")
    wait_for(lambda: (node_state(d) or "").rstrip("*") in ("idle", "mixed", "allocated"), "the node (sinfo: idle)", 60)
    sys.stdout.write(env_lines(d))
    return 0


def stop(d: Path, quiet: bool = False) -> int:
    """SIGTERM to each daemon by the PID in its pid file (slurmd, slurmctld, then munged);
    SIGKILL to one still alive after 10 s. Jobs still running are killed with slurmd."""
    if read_pid(d / "slurmctld.pid"):
        subprocess.run(
            [program("scancel"), "--full", "--quiet", "-u", "root"], env=environ(d), capture_output=True, timeout=20
        )
    for name in ("slurmd", "slurmctld", "munged"):
        pid = pids(d)[name]
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and read_pid_alive(pid):
            time.sleep(0.2)
        if read_pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        if not quiet:
            print(f"stopped {name} (PID {pid})")
    return 0


def read_pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of ours is not alive
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def status(d: Path) -> int:
    running = pids(d)
    for name, pid in running.items():
        print(f"{name}: {'PID ' + str(pid) if pid else 'not running'}")
    state = node_state(d)
    print(f"node: {state or 'no answer from sinfo'}")
    if all(running.values()) and state:
        sys.stdout.write(env_lines(d))
        return 0
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    args = parser.parse_args(argv)
    d = cluster_dir()
    return {"start": start, "stop": stop, "status": status}[args.command](d)


if __name__ == "__main__":
    sys.exit(main())
