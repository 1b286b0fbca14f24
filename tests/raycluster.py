"""A real Ray cluster on this machine for the tests: a head that runs nothing and worker nodes
with one CPU and one GPU each (logical GPUs: Ray only counts them), every node a `ray start
--block` process in a session of its own. It is stopped by those sessions' process groups, never
by `ray stop`, which would stop every Ray on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RAY = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
       "--object-store-memory", str(80 * 2**20),
       "--include-log-monitor", "false"]  # one Python process less per node; the sweep reads no task logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Starts at once and boots in the background; `ready()` waits for every node."""

    def __init__(self, workers: int = 2, timeout: float = 120):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths must stay short
        self.began = time.monotonic()
        self.deadline = self.began + timeout
        self.started: list[float] = []  # seconds from the start until each node was up
        self.nodes: list[subprocess.Popen] = []
        self.retries = 0  # worker nodes killed and started again after missing Ray's 30 s
        self.head = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "0",
                                         "--num-gpus", "0", "--include-dashboard", "false",
                                         "--temp-dir", str(self.temp)])
        self.error: BaseException | None = None
        self._booting = threading.Thread(target=self._boot, args=(workers,), daemon=True)
        self._booting.start()

    def _start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        log = self.temp / f"{name}.log"
        with log.open("w") as f:
            # Token authentication off on every node, whatever this machine has: a head started by
            # `ray start` turns it on by itself when ~/.ray/auth_token exists (a local ray.init()
            # writes one), and worker nodes started the same way do not, so they cannot join (Ray 2.60).
            node = subprocess.Popen(RAY + args, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        self.nodes.append(node)
        return node, log

    def _boot(self, workers: int) -> None:
        """The head, then one worker node at a time: Ray gives a node 30 s to register with the
        head, which several booting at once on two busy cores can miss; a worker node that misses
        it is killed and started again."""
        try:
            self._wait_started(*self.head, retry=False)
            for i in range(workers):
                for attempt in range(3):
                    worker = self._start(f"worker{i}-{attempt}", ["--address", self.address,
                                                                  "--num-cpus", "1", "--num-gpus", "1"])
                    if self._wait_started(*worker, retry=attempt < 2):
                        break
        except BaseException as err:
            self.error = err

    def _wait_started(self, node: subprocess.Popen, log: Path, retry: bool) -> bool:
        while "Ray runtime started" not in log.read_text():
            if node.poll() is not None or time.monotonic() > self.deadline:
                if retry and time.monotonic() < self.deadline:
                    _kill_group(node)
                    self.retries += 1
                    return False
                raise TimeoutError(f"a Ray node did not start; its log ends: {log.read_text()[-1500:]}")
            time.sleep(0.2)
        self.started.append(round(time.monotonic() - self.began, 1))
        return True

    def ready(self) -> str:
        self._booting.join()
        if self.error:
            raise self.error
        return self.address

    def processes(self) -> list[int]:
        """Every process still in one of the nodes' process groups."""
        groups = {p.pid for p in self.nodes}
        left = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if os.getpgid(int(entry.name)) in groups and not _zombie(entry):
                        left.append(int(entry.name))
                except (ProcessLookupError, PermissionError):
                    pass
        return left

    def other_clusters(self) -> set[str]:
        """Traces of Ray clusters on this machine other than this one: their GCS servers and raylets
        (the processes a cluster is made of; outside this cluster's process groups and not its
        descendants), and their session folders in Ray's default temporary folder. A Ray worker
        process is not a trace: a node starts those by itself, some in process groups of their own."""
        ours = {p.pid for p in self.nodes}
        found = set()
        for entry in Path("/proc").iterdir():
            try:
                argv0 = entry.joinpath("cmdline").read_bytes().split(b"\0", 1)[0]
                pid = int(entry.name)
                if Path(argv0.decode()).name in ("gcs_server", "raylet") and os.getpgid(pid) not in ours \
                        and not ours & _ancestors(pid):
                    found.add(f"{Path(argv0.decode()).name} {pid}")
            except (OSError, ValueError):
                pass
        default = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
        return found | {str(p) for p in default.glob("session_2*")}

    def stop(self) -> None:
        self._booting.join()
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            for node in self.nodes:
                try:
                    os.killpg(node.pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + wait
            while self.processes() and time.monotonic() < end:
                time.sleep(0.2)
        for node in self.nodes:
            node.wait(10)
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(10)


def _ancestors(pid: int) -> set[int]:
    found = set()
    while pid > 1 and pid not in found:
        found.add(pid)
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return found


def _zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
