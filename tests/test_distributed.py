"""torchrun's environment, read in one place (ccs_fast/distributed.py)."""
from ccs_fast.distributed import DistEnv, cores_per_process, dist_env


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
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    env = dist_env()
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (5, 8, 1, 4)
    assert env.distributed and not env.is_main
    assert cores_per_process() == 4
