"""torchrun's environment, read in one place (ccs_fast/base/distributed.py)."""
import random

import pytest

from ccs_fast.base import distributed
from ccs_fast.base.distributed import (CpuPlan, DistEnv, available_cores, cgroup_cpu_limit, cores_per_process,
                                  dist_env, plan_cpu)


def test_single_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    env = dist_env()
    assert env == DistEnv() and env.is_main and not env.distributed


def test_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(distributed, "available_cores", lambda: 16)
    env = dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.distributed and not env.is_main
    assert cores_per_process() == 4


def _cgroup_v2(tmp_path, quota: str, nested_quota: str | None = None):
    root = tmp_path / "cgroup"
    (root / "job" / "step").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "job" / "cpu.max").write_text(quota)
    if nested_quota is not None:
        (root / "job" / "step" / "cpu.max").write_text(nested_quota)
    proc = tmp_path / "self-cgroup"
    proc.write_text("0::/job/step\n")
    return str(root), str(proc)


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path):
    period = random.choice([50_000, 100_000])
    cores = random.randint(2, 9)
    root, proc = _cgroup_v2(tmp_path, f"{cores * period} {period}\n", f"{(cores + 3) * period} {period}\n")
    assert cgroup_cpu_limit(root, proc) == pytest.approx(cores)
    root, proc = _cgroup_v2(tmp_path / "b", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) is None


def test_cgroup_v1_quota(tmp_path):
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("150000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "self-cgroup"
    proc.write_text("3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    assert cgroup_cpu_limit(str(tmp_path / "cgroup"), str(proc)) == pytest.approx(1.5)
    (folder / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cgroup_cpu_limit(str(tmp_path / "cgroup"), str(proc)) is None


def test_available_cores_follow_affinity_and_quota(monkeypatch):
    cores = set(random.sample(range(64), random.randint(3, 12)))
    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: cores)
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: None)
    assert available_cores() == len(cores)
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: 2.5)  # docker --cpus 2.5
    assert available_cores() == 2
    monkeypatch.setattr(distributed, "cgroup_cpu_limit", lambda: 0.5)
    assert available_cores() == 1


@pytest.mark.parametrize("cores", [1, 2, 3, 4, 7, 16, 64])
@pytest.mark.parametrize("processes", [1, 2, 4])
def test_plan_never_has_more_threads_than_cores(cores, processes):
    plan = plan_cpu(processes=processes, cores=cores)
    assert 1 <= plan.processes <= min(processes, cores)
    assert plan.processes * (plan.threads + plan.loader_workers) <= max(cores, plan.processes)
    assert plan.threads >= 1 and plan.cores == cores
    assert "intra-op" in plan.describe()


def test_plan_on_two_cores():
    assert plan_cpu(processes=2, cores=2) == CpuPlan(cores=2, processes=2, threads=1, loader_workers=0)
    assert plan_cpu(processes=1, cores=2) == CpuPlan(cores=2, processes=1, threads=2, loader_workers=0)
    # threads asked for: as many processes at once as fit
    assert plan_cpu(processes=2, threads=2, cores=2) == CpuPlan(cores=2, processes=1, threads=2, loader_workers=0)
    assert plan_cpu(processes=1, cores=16) == CpuPlan(cores=16, processes=1, threads=12, loader_workers=4)


def test_omp_num_threads_is_kept_by_the_plan(monkeypatch):
    import torch

    from ccs_fast.base.distributed import apply_cpu_plan, threads_from_environment

    before = torch.get_num_threads()
    monkeypatch.setattr(distributed, "available_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        for value, expected in (("", None), ("abc", None), ("0", None), (" 3 ", 3)):
            monkeypatch.setenv("OMP_NUM_THREADS", value)
            assert threads_from_environment() == expected
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert apply_cpu_plan().threads == 3 and torch.get_num_threads() == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        plan = apply_cpu_plan()
        assert (plan.threads, plan.loader_workers) == (6, 2) and torch.get_num_threads() == 6
    finally:
        torch.set_num_threads(before)
