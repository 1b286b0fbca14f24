"""Where the sweep's work runs: threads on this machine, or Ray tasks on a cluster. An engine's
`submit(fn, *args)` calls fn(*args, place) there and returns a Future. Only this module knows Ray."""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..settings import ShortError, shown_path
from ..train import PROGRESS_ENV
from .run import notebooks_dir

DEVICE_VARIABLES = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
RAY_REQUIREMENT = "ray>=2.40,<3"  # as in pyproject.toml's [ray] extra
GRACE_SECONDS = 5  # a cancelled run's processes get this long to stop before they are killed

@dataclass(frozen=True)
class Where:  # where and how long a piece of work ran
    host: str
    node: str
    pid: int
    devices: str
    seconds: float

@dataclass(frozen=True)
class Place:
    """Work's environment, whether it gets a session of its own (a cancel stops it all), Ray's node id."""

    env: dict[str, str]
    own_session: bool
    node: str

    def where(self, seconds: float) -> Where:
        """Its devices: '' when none were set, 'none' when the GPUs were hidden (a Ray task without one)."""
        given = {k: self.env[k] for k in DEVICE_VARIABLES if k in self.env}
        devices = " ".join(f"{k}={v}" for k, v in given.items() if v) or ("none" if given else "")
        return Where(socket.gethostname(), self.node, os.getpid(), devices, round(seconds, 1))

def run_process(command: list[str], place: Place) -> tuple[subprocess.CompletedProcess, Where]:
    """Run a command (output captured); in its own session (Ray), an interrupt stops its whole group."""
    start = time.monotonic()
    process = subprocess.Popen(command, env=place.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=place.own_session)
    try:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):  # short waits: Ray's cancel gets in
                stdout, stderr = process.communicate(timeout=0.5)
                break
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            if place.own_session:  # the whole group: SIGTERM, and SIGKILL after GRACE_SECONDS
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        raise
    return (subprocess.CompletedProcess(command, process.returncode, stdout, stderr),
            place.where(time.monotonic() - start))

class LocalEngine:
    """Work in threads on this machine, `jobs` at once (each runs its own processes)."""

    def __init__(self, jobs: int = 1):
        self.jobs, self._pool = jobs, ThreadPoolExecutor(max_workers=jobs)

    def submit(self, fn: Callable, *args: Any, slot: int = 0) -> Future:
        threads = str(max(1, (os.cpu_count() or 1) // self.jobs))  # a CPU's threads divided between jobs
        env = dict(os.environ, **{PROGRESS_ENV: "text"}, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if (gpus := torch.cuda.device_count()) > 1 and self.jobs > 1:  # one GPU per job
            env[DEVICE_VARIABLES[0] if torch.version.hip else DEVICE_VARIABLES[1]] = str(slot % gpus)
        return self._pool.submit(fn, *args, Place(env, own_session=False, node="local"))

    def failure(self, err: BaseException) -> str:
        raise err  # here, a failure that fn did not record is the sweep's own

    def check_folder(self, out: Path) -> None:
        pass  # this machine writes its own folder

    def cancel(self) -> None:  # start nothing new; running papermills got Ctrl-C from the terminal too
        self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        self._pool.shutdown()

class RayEngine:
    """A Ray task per piece of work on an existing cluster; not retried (running the sweep again is)."""

    def __init__(self, address: str | None, gpus: float | None = None, cpus: float = 1.0):
        self.address = address or os.environ.get("RAY_ADDRESS") or ""
        self.gpus, self.cpus, self._refs, self._ray = gpus, cpus, [], None

    def connect(self) -> str:
        """Check Ray, the address, the cluster and the resources one configuration asks for; say so."""
        address, rocr = self.address, os.environ.get("ROCR_VISIBLE_DEVICES")
        host, _, port = address.rpartition(":")
        for wrong, message in [
            (not address, "--engine ray needs the cluster's address: give --address HOST:PORT (the address "
             "`ray start --head` prints) or set RAY_ADDRESS."),
            (address.startswith("ray://"), f"--address {address}: Ray Client addresses (ray://) are not "
             "supported; run the sweep on a node of the cluster with --address HOST:PORT."),
            (self.cpus <= 0, f"--cpus-per-config={self.cpus:g}: give a number above 0 (default 1)."),
            (self.gpus is not None and (self.gpus < 0 or (self.gpus > 1 and self.gpus != int(self.gpus))),
             f"--gpus-per-config={self.gpus or 0:g}: give 0, a fraction up to 1, or a whole number of GPUs."),
            (rocr and not os.environ.get("HIP_VISIBLE_DEVICES"), f"ROCR_VISIBLE_DEVICES={rocr} is set, which "
             "Ray refuses: export HIP_VISIBLE_DEVICES=$ROCR_VISIBLE_DEVICES; unset ROCR_VISIBLE_DEVICES, "
             "here and before `ray start` on every node."),
            (address not in ("", "auto") and (not host or not port.isdigit()), f"--address {address!r}: "
             "expected HOST:PORT, e.g. 10.0.0.1:6379, as `ray start --head` prints it.")]:
            if wrong:
                raise ShortError(message)
        try:
            import ray
        except ImportError:
            raise ShortError(f"--engine ray needs Ray, which is not installed here: pip install -e '.[ray]' "
                             f"(or pip install '{RAY_REQUIREMENT}'), on every node of the cluster.") from None
        try:  # a closed HOST:PORT is refused at once, before Ray would retry for a minute
            if address != "auto":
                socket.create_connection((host, int(port)), timeout=5).close()
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except (OSError, RuntimeError) as err:  # ray.init's ConnectionError is an OSError
            raise ShortError(f"--address {address}: no Ray cluster answers there ({err}). Start one "
                             "(docs/sweeps.md): the sweep never starts a cluster itself.") from None
        self._ray = ray
        alive = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        self.gpus = int(any(r.get("GPU", 0) for r in alive)) if self.gpus is None else self.gpus
        for option, kind, asked in (("gpus", "GPU", self.gpus), ("cpus", "CPU", self.cpus)):
            if asked > (most := max((r.get(kind, 0) for r in alive), default=0)):
                self.close()
                raise ShortError(f"--{option}-per-config={asked:g}: no node of the cluster at {address} has "
                                 f"that many {kind}s (the most on one node is {most:g}): give at most that.")
        return (f"on the Ray cluster at {address}: {len(self.nodes())} node(s) can take a configuration, "
                f"each asking for {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s)")

    def nodes(self) -> list[dict]:  # the live nodes that can hold one configuration
        return [n for n in self._ray.nodes() if n["Alive"]
                and n["Resources"].get("CPU", 0) >= self.cpus and n["Resources"].get("GPU", 0) >= self.gpus]

    def check_folder(self, out: Path) -> None:
        """One task pinned to each node checks that it reads and writes `out` and has the notebooks."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        (probe := out / f".ray-check-{token}").write_text(token)
        check, nodes = self._ray.remote(num_cpus=0, max_retries=0)(_check_node), self.nodes()
        try:
            refs = {check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                n["NodeID"], soft=False)).remote(str(probe), token): n for n in nodes}
            ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=120)
            for ref, node in refs.items():
                name = f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]})"
                if ref not in ready:
                    raise ShortError(f"{name} did not answer within 2 minutes; check `ray status`.")
                try:
                    problem = self._ray.get(ref)
                except Exception as err:  # e.g. lora_tutorial is not installed there
                    raise ShortError(f"{name} cannot run the sweep's code: {_last_line(err)}. Install "
                                     "the project on every node (pip install -e '.[ray]').") from None
                if problem:
                    raise ShortError(f"{name}: {problem}")
        finally:
            for path in out.glob(f".ray-check-{token}*"):
                path.unlink(missing_ok=True)
        if not nodes:
            raise ShortError(f"no live node of the cluster at {self.address} can take a configuration.")

    def submit(self, fn: Callable, *args: Any, slot: int = 0) -> Future:
        remote = self._ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_in_task)
        self._refs.append(remote.remote(fn, args))
        return self._refs[-1].future()

    def failure(self, err: BaseException) -> str:  # the task's own ShortError, else Ray's last line
        cause = getattr(err, "cause", None)
        return str(cause) if isinstance(cause, ShortError) else f"the Ray task failed: {_last_line(err)}"

    def cancel(self) -> None:
        """Cancel what is pending or running (a task stops its papermill and kernel); wait a little."""
        if self._refs:  # only submit() adds to it, once connected
            for ref in self._refs:
                self._ray.cancel(ref)
            self._ray.wait(self._refs, num_returns=len(self._refs), timeout=2 * GRACE_SECONDS + 5)
            self._refs = []

    def close(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()

def _in_task(fn: Callable, args: tuple) -> Any:
    """Inside a Ray task: call fn with the task's place (the devices Ray gave it)."""
    import ray

    context = ray.get_runtime_context()
    env = dict(os.environ, **{PROGRESS_ENV: "text"})
    if not context.get_accelerator_ids().get("GPU"):
        env.update(dict.fromkeys(DEVICE_VARIABLES, ""))  # no GPU asked for: the notebook must not take one
    return fn(*args, Place(env, own_session=True, node=context.get_node_id()))

def _check_node(probe: str, token: str) -> str:
    """On one node: '' when it reads the driver's file, writes beside it and finds the notebooks."""
    if not ((path := Path(probe)).is_file() and path.read_text() == token):
        return (f"cannot read {shown_path(path.parent)}, the sweep's --out: results need a folder every "
                "node can read and write (a shared file system such as NFS); give --out on one.")
    try:
        (path.parent / f"{path.name}-{uuid.uuid4().hex[:8]}").write_text(token)
    except OSError as err:
        return f"cannot write in {shown_path(path.parent)}, the sweep's --out ({err.strerror})."
    if not (notebooks_dir() / "06_compare.ipynb").is_file():
        return (f"lora_tutorial is installed at {Path(__file__).parent} without the notebooks beside it; "
                "install it from a clone of the project (pip install -e '.[ray]').")
    return ""

def _last_line(err: BaseException) -> str:  # the message: Ray prints its traceback first
    return (str(err).strip().splitlines() or [type(err).__name__])[-1]
