"""The torchrun environment, read in one place.

``torchrun`` starts one process per GPU and tells each its place through ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; a plain ``python`` run has none of
them and is rank 0 of 1. The trainer, both loader backends and the worker-count defaults
read the environment only through ``dist_env()``.

The set-up of a training process is here too (``training_process``: the process group, NCCL on
CUDA and gloo on CPU, ``deterministic_mode`` and the device's flags), the seeds, and the
collectives the trainer needs around rank 0's work (``on_main_rank``, ``gather_objects``,
``any_rank``). torch is imported only where it is used: the CPU plan serves processes that
never load it.

The cores a process may use (``available_cores``: CPU affinity and the cgroup's CPU quota, not
the machine's core count) and how a CPU job splits them among training processes, intra-op
threads and loader workers (``plan_cpu``) are decided here too.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ccs_fast.base.errors import CCSError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_env() -> DistEnv:
    """This process's place among torchrun's processes; a single process when the variables
    are absent."""
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


# ---------------------------------------------------------------------------- process set-up

@contextlib.contextmanager
def training_process(env: DistEnv, device, deterministic: bool):
    """The set-up of one training process on ``device`` (``evaluate.select_device``):
    torch.distributed's default group when there are several processes (NCCL on CUDA, gloo on
    CPU; one the caller made already is used and kept) and ``deterministic_mode``, both undone
    on exit, and the device's flags (``set_device_flags``: cuDNN benchmark and TF32), which
    stay set for the rest of the process."""
    import torch.distributed as dist

    own_group = env.distributed and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        with deterministic_mode(deterministic):
            set_device_flags(device, deterministic)
            yield
    finally:
        if own_group:
            dist.destroy_process_group()


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """``train.deterministic``: torch's deterministic algorithms (warning, not failing, on an op
    that has none), cuDNN without autotuning, cuBLAS with a fixed workspace; the ccs_fast ops
    then take their atomic-free paths (their ``deterministic=None`` follows torch's flag).
    The previous settings come back afterwards."""
    if not enabled:
        yield
        return
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]
        if before[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def set_device_flags(device, deterministic: bool) -> None:
    """On CUDA: cuDNN autotuning unless ``deterministic``, TF32 matmuls and convolutions."""
    if device.type == "cuda":
        import torch

        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def on_main_rank(env: DistEnv, action: Callable):
    """``action()`` on rank 0 only; a CCSError there is raised on every rank (the others
    would otherwise wait for rank 0 in the next collective for ever)."""
    result, message = None, None
    if env.is_main:
        try:
            result = action()
        except CCSError as exc:
            message = str(exc)
    if env.distributed:
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise CCSError(message)
    return result


def gather_objects(env: DistEnv, value) -> list:
    """``value`` of every rank, in rank order (a collective under DDP)."""
    if not env.distributed:
        return [value]
    import torch.distributed as dist

    values = [None] * env.world_size
    dist.all_gather_object(values, value)
    return values


def any_rank(env: DistEnv, flag: bool, device) -> bool:
    """Whether ``flag`` holds on any rank (a MAX all-reduce and a host sync under DDP)."""
    if not env.distributed:
        return flag
    import torch
    import torch.distributed as dist

    box = torch.tensor([float(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def cores_per_process() -> int:
    """The cores available to this process tree (``available_cores``) shared among the
    processes torchrun started on this machine."""
    return max(1, available_cores() // dist_env().local_world_size)


# ---------------------------------------------------------------------------- CPU plan
#
# On a CPU the intra-op threads of torch, the loader's worker processes and other processes of
# the same job (the demo's variants, synth's pool) share the same few cores. More runnable
# threads than cores is the expensive case: torch's OpenMP threads meet at a barrier after
# every op, and one descheduled thread stalls the others (the demo's training measured 1.8
# clips/s with 2 intra-op threads and 2 loader workers on a 2-core machine beside another job,
# 14.9 with 1 thread). So the plan gives every process a whole number of cores and never
# more threads than those cores.

CGROUP_ROOT = "/sys/fs/cgroup"


def cgroup_cpu_limit(root: str = CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup") -> Optional[float]:
    """The CPU quota of this process's cgroup in cores (``docker --cpus``, Kubernetes CPU
    limits, systemd's CPUQuota), or None when there is none or it cannot be read.

    cgroup v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") of the process's cgroup and its
    ancestors, the smallest quota wins; cgroup v1: ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: walk up from the process's cgroup
            folder = Path(root) / path.lstrip("/")
            for directory in (folder, *folder.parents):
                limits.append(_cpu_max(directory / "cpu.max"))
                if directory == Path(root):
                    break
        elif "cpu" in controllers.split(","):
            for base in {Path(root) / controllers, Path(root) / "cpu,cpuacct", Path(root) / "cpu"}:
                limits.append(_cfs_quota(base / path.lstrip("/")))
                limits.append(_cfs_quota(base))
    limits = [limit for limit in limits if limit]
    return min(limits) if limits else None


def _cpu_max(path: Path) -> Optional[float]:
    try:
        quota, period = path.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: Path) -> Optional[float]:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cores() -> int:
    """Cores this process may use: its CPU affinity (taskset, cpusets; ``os.cpu_count()`` where
    the platform has no affinity), capped by the cgroup's CPU quota rounded down (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


@dataclass(frozen=True)
class CpuPlan:
    """How a CPU job splits ``cores``: ``processes`` concurrent training processes (the demo's
    variants), each with ``threads`` intra-op threads and ``loader_workers`` loader processes."""
    cores: int
    processes: int
    threads: int
    loader_workers: int

    def describe(self) -> str:
        loader = (f"{self.loader_workers} loader worker(s)" if self.loader_workers
                  else "loading in the training process")
        each = f"{self.processes} processes x " if self.processes > 1 else ""
        return f"CPU plan: {self.cores} core(s) available, {each}{self.threads} intra-op thread(s), {loader}"


# A loader worker process pays for itself once a process has this many cores: below it the
# decoding of a batch costs less than the cores it would take from the model's threads.
CORES_PER_LOADER_WORKER = 4


def plan_cpu(processes: int = 1, threads: Optional[int] = None, loader_workers: Optional[int] = None,
             cores: Optional[int] = None) -> CpuPlan:
    """Split the available cores (``available_cores()``, or ``cores``) among ``processes``
    training processes (at most one per core). Each gets ``threads`` intra-op threads (default:
    its share of the cores less its loader workers) and ``loader_workers`` (default: one per
    ``CORES_PER_LOADER_WORKER`` cores of its share, none below that). Given ``threads``, only
    as many processes run at once as fit: ``cores // threads`` (at least 1)."""
    cores = cores or available_cores()
    processes = max(1, min(processes, cores))
    if threads is not None:
        processes = max(1, min(processes, cores // threads))
    share = max(1, cores // processes)
    if loader_workers is None:
        loader_workers = share // CORES_PER_LOADER_WORKER
    if threads is None:
        threads = max(1, share - loader_workers)
    return CpuPlan(cores=cores, processes=processes, threads=threads, loader_workers=loader_workers)


def default_loader_workers(device: str) -> int:
    """``data.num_workers`` when unset: on a GPU every core of this process's share
    (``cores_per_process``) decodes; on a CPU the cores also run the model, and the loader gets
    the workers of ``plan_cpu`` (none below ``CORES_PER_LOADER_WORKER`` cores)."""
    if str(device).startswith("cpu"):
        return plan_cpu(cores=cores_per_process()).loader_workers
    return cores_per_process()


def threads_from_environment() -> Optional[int]:
    """``OMP_NUM_THREADS`` when the user set it to a positive whole number (a container, a
    batch script or ``taskset`` users often do): the plan then keeps that thread count."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def apply_cpu_plan(processes: int = 1) -> CpuPlan:
    """Plan this process's share of the cores (``plan_cpu`` over ``cores_per_process()``,
    ``OMP_NUM_THREADS`` kept when set) and give torch that many intra-op threads."""
    import torch

    plan = plan_cpu(processes=processes, threads=threads_from_environment(), cores=cores_per_process())
    torch.set_num_threads(plan.threads)
    return plan
