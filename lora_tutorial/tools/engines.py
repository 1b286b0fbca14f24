"""Where the sweep's configurations run: threads on this machine, or Ray tasks on a cluster.

An engine runs one function once (the shared pre-training) and then over a list of items (the
configurations), yielding each item's result as it finishes; the grid, resume, table and plots
stay in `sweep.py`. The function is given a `Place`: the environment for the processes it starts
and where it runs. Only this module knows Ray.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..settings import ShortError, shown_path
from ..train import PROGRESS_ENV

DEVICE_VARIABLES = ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
RAY_REQUIREMENT = "ray>=2.40,<3"  # as in pyproject.toml's [ray] extra
GRACE_SECONDS = 5  # a cancelled run's processes get this long to stop before they are killed


@dataclass(frozen=True)
class Place:
    """Where a piece of work runs, and how it starts processes there."""

    env: dict[str, str]  # the environment for the processes it starts (papermill, the kernel)
    own_session: bool  # start them in a session of their own, so that a cancel can stop them all
    node: str  # Ray's node id, or "local"

    @property
    def devices(self) -> str:
        """The visible-devices setting the work was given: '' when none was set, 'none' when the
        GPUs were hidden from it (a Ray task that asked for no GPU)."""
        given = {k: self.env[k] for k in DEVICE_VARIABLES if k in self.env}
        if given and not any(given.values()):
            return "none"
        return " ".join(f"{k}={v}" for k, v in given.items() if v)

    def where(self, seconds: float) -> dict[str, Any]:
        return {"host": socket.gethostname(), "node": self.node, "pid": os.getpid(),
                "devices": self.devices, "seconds": round(seconds, 1)}


def run_process(command: list[str], place: Place) -> subprocess.CompletedProcess:
    """Run a command to its end with the place's environment; its output is captured.

    In its own session (Ray), an interrupt (Ray's cancel raises KeyboardInterrupt here) stops the
    whole process group; the notebook kernel, which papermill starts in a session of its own,
    shuts itself down within a second of losing papermill, its parent.
    """
    process = subprocess.Popen(command, env=place.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=place.own_session)
    try:
        while True:
            try:  # in short waits: Ray's cancel interrupts only between Python steps
                stdout, stderr = process.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        if place.own_session:
            _stop_group(process)
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _stop_group(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(GRACE_SECONDS)
            return
        except subprocess.TimeoutExpired:
            continue


class LocalEngine:
    """Configurations in threads on this machine, `jobs` at once (each runs its own processes)."""

    def __init__(self, jobs: int = 1):
        self.jobs = jobs
        self._pool: ThreadPoolExecutor | None = None

    def check_folder(self, out: Path) -> None:
        """Nothing to check: this machine writes its own folder."""

    def call(self, fn: Callable, *args: Any) -> Any:
        return fn(*args, self.place(0))

    def map(self, fn: Callable, items: list, *args: Any) -> Iterator[tuple[Any, Any, str | None]]:
        """Yield (item, fn's result, None) as each item finishes (fn reports its own failures)."""
        self._pool = ThreadPoolExecutor(max_workers=self.jobs)
        futures = {self._pool.submit(fn, item, *args, self.place(i % self.jobs)): item
                   for i, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result(), None
        self._pool.shutdown()

    def cancel(self) -> None:
        """Start nothing new; the running papermill processes got Ctrl-C from the terminal too."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pass

    def place(self, slot: int) -> Place:
        """Threads divided between jobs on a CPU; one GPU per job where several are visible."""
        env = dict(os.environ, **{PROGRESS_ENV: "text"})
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        gpus = _visible_gpus()
        if gpus > 1 and self.jobs > 1:
            env[_device_variable()] = str(slot % gpus)
        return Place(env, own_session=False, node="local")


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_variable() -> str:
    import torch

    return "HIP_VISIBLE_DEVICES" if torch.version.hip else "CUDA_VISIBLE_DEVICES"


class RayEngine:
    """One Ray task per configuration on an existing cluster (Ray Core; never a cluster of its own).

    Each task asks for `cpus` CPUs and `gpus` GPUs; Ray gives it its own devices through
    CUDA_VISIBLE_DEVICES or HIP_VISIBLE_DEVICES. Tasks are not retried: running the sweep again is
    the retry. Results go to a folder every node must be able to read and write.
    """

    def __init__(self, address: str | None, gpus: float | None = None, cpus: float = 1.0):
        self.address = address or os.environ.get("RAY_ADDRESS") or ""
        self.gpus = gpus
        self.cpus = cpus
        self._refs: dict = {}
        self._ray = None

    # -- refusals, before any work ------------------------------------------------------------
    def connect(self) -> None:
        """Check Ray, the address, the cluster and the resources one configuration asks for."""
        if not self.address:
            raise ShortError("--engine ray needs the cluster's address: give --address HOST:PORT (the "
                             "address `ray start --head` prints) or set RAY_ADDRESS.")
        if self.address.startswith("ray://"):
            raise ShortError(f"--address {self.address}: Ray Client addresses (ray://) are not supported; "
                             "run the sweep on a node of the cluster with --address HOST:PORT.")
        if self.cpus <= 0:
            raise ShortError(f"--cpus-per-config={self.cpus:g}: give a number above 0 (default 1).")
        if self.gpus is not None and (self.gpus < 0 or (self.gpus > 1 and self.gpus != int(self.gpus))):
            raise ShortError(f"--gpus-per-config={self.gpus:g}: give 0, a fraction up to 1, or a whole "
                             "number of GPUs.")
        ray = require_ray()
        if self.address != "auto":
            check_listening(self.address)
        import logging

        try:
            ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING,
                     configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            raise ShortError(f"--address {self.address}: could not join a Ray cluster there ({err}). "
                             "The sweep never starts a cluster of its own: start one "
                             "(docs/sweeps.md).") from None
        self._ray = ray
        nodes = [n for n in ray.nodes() if n["Alive"]]
        most_gpus = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
        most_cpus = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
        if self.gpus is None:
            self.gpus = 1 if most_gpus else 0
        if self.gpus > most_gpus:
            self.close()
            raise ShortError(f"--gpus-per-config={self.gpus:g}: no node of the cluster at {self.address} "
                             f"has that many GPUs (the most on one node is {most_gpus:g}), so the tasks "
                             f"would wait forever; give --gpus-per-config {most_gpus:g} or fewer.")
        if self.cpus > most_cpus:
            self.close()
            raise ShortError(f"--cpus-per-config={self.cpus:g}: no node of the cluster at {self.address} "
                             f"has that many CPUs (the most on one node is {most_cpus:g}), so the tasks "
                             f"would wait forever; give --cpus-per-config {most_cpus:g} or fewer.")

    def nodes(self) -> list[dict]:
        """The live nodes that can hold one configuration."""
        return [n for n in self._ray.nodes() if n["Alive"]
                and n["Resources"].get("CPU", 0) >= self.cpus and n["Resources"].get("GPU", 0) >= self.gpus]

    def describe(self) -> str:
        nodes = self.nodes()
        return (f"on the Ray cluster at {self.address}: {len(nodes)} node(s) can take a configuration, "
                f"each asking for {self.cpus:g} CPU(s) and {self.gpus:g} GPU(s)")

    def check_folder(self, out: Path) -> None:
        """Every node that may run a configuration must read and write `out` (a shared file system)
        and have the project's notebooks: one small task pinned to each node checks."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token = uuid.uuid4().hex
        probe = out / f".ray-check-{token}"
        probe.write_text(token)
        check = self._ray.remote(num_cpus=0, max_retries=0)(_check_node)
        nodes = self.nodes()
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

    # -- work -------------------------------------------------------------------------------
    def _remote(self):
        return self._ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(_in_task)

    def call(self, fn: Callable, *args: Any) -> Any:
        ref = self._remote().remote(fn, args)
        self._refs = {ref: None}
        for _, result, error in self._wait():
            if error:
                raise ShortError(error)
            return result

    def map(self, fn: Callable, items: list, *args: Any) -> Iterator[tuple[Any, Any, str | None]]:
        remote = self._remote()
        self._refs = {remote.remote(fn, (item, *args)): item for item in items}
        yield from self._wait()

    def _wait(self) -> Iterator[tuple[Any, Any, str | None]]:
        ray = self._ray
        while self._refs:
            done, _ = ray.wait(list(self._refs), num_returns=1, timeout=1.0)  # a second: Ctrl-C gets in
            for ref in done:
                item = self._refs.pop(ref)
                try:
                    yield item, ray.get(ref), None
                except ray.exceptions.RayError as err:  # the task raised, or its worker died
                    cause = getattr(err, "cause", None)
                    yield item, None, (str(cause) if isinstance(cause, ShortError)
                                       else f"the Ray task failed: {_last_line(err)}")

    def cancel(self) -> None:
        """Cancel what is pending or running (a running task stops its papermill and kernel) and
        wait a little for the running ones to stop; what finished stays on disk."""
        if not self._refs or self._ray is None:
            return
        for ref in self._refs:
            self._ray.cancel(ref)
        self._ray.wait(list(self._refs), num_returns=len(self._refs), timeout=2 * GRACE_SECONDS + 5)
        self._refs = {}

    def close(self) -> None:
        if self._ray is not None and self._ray.is_initialized():
            self._ray.shutdown()


def require_ray():
    """Ray, imported; or one sentence on how to get it (or how to get past its ROCm check)."""
    rocr = os.environ.get("ROCR_VISIBLE_DEVICES")
    if rocr and not os.environ.get("HIP_VISIBLE_DEVICES"):
        raise ShortError(f"ROCR_VISIBLE_DEVICES={rocr} is set (Slurm sets it on "
                         "AMD nodes) and Ray refuses to start with it: run export HIP_VISIBLE_DEVICES="
                         "$ROCR_VISIBLE_DEVICES; unset ROCR_VISIBLE_DEVICES, here and before `ray start` on "
                         "every node.")
    try:
        import ray
    except ImportError:
        raise ShortError(f"--engine ray needs Ray, which is not installed here: pip install -e '.[ray]' "
                         f"(or pip install '{RAY_REQUIREMENT}'), on every node of the cluster.") from None
    return ray


def check_listening(address: str) -> None:
    """A closed or unreachable HOST:PORT is refused at once, before Ray would retry for a minute."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ShortError(f"--address {address!r}: expected HOST:PORT, e.g. 10.0.0.1:6379, as `ray start "
                         "--head` prints it.")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ShortError(f"--address {address}: no Ray cluster answers there ({err.strerror or err}). "
                         "Start one first (docs/sweeps.md); the sweep never starts "
                         "a cluster of its own.") from None


def _in_task(fn: Callable, args: tuple) -> Any:
    """Runs inside a Ray task: call fn with the task's place (the devices Ray gave it)."""
    import ray

    env = dict(os.environ, **{PROGRESS_ENV: "text"})
    if not ray.get_runtime_context().get_accelerator_ids().get("GPU"):
        for name in DEVICE_VARIABLES:  # no GPU asked for: the notebook must not take one
            env[name] = ""
    node = ray.get_runtime_context().get_node_id()
    return fn(*args, Place(env, own_session=True, node=node))


def _check_node(probe: str, token: str) -> str:
    """Runs on one node: '' when it can read the driver's file, write beside it and find the
    notebooks; else what is wrong."""
    from .run import notebooks_dir

    path = Path(probe)
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    if seen != token:
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


def _last_line(err: BaseException) -> str:
    """The exception's own message: the last line of what Ray prints (its traceback comes first)."""
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def engine_summary(rows: list[dict]) -> str:
    """'ran on 2 node(s): host/abcd1234 x1, ...' from the table's where-it-ran columns."""
    counts: dict[str, int] = {}
    for r in rows:
        if r.get("node"):
            key = f"{r['host']}/{str(r['node'])[:8]}"
            counts[key] = counts.get(key, 0) + 1
    return f"ran on {len(counts)} node(s): " + ", ".join(f"{k} x{v}" for k, v in counts.items())

