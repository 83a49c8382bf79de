"""bench.gpu: the plan fits 8 minutes, its dry run writes a summary and rows, a stage that
overruns keeps what it measured, and the summary's arithmetic."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu import cli, logs, plan, runner, targets

REPO = Path(__file__).resolve().parents[2]


def test_plan_budgets_fit_eight_minutes_with_setup():
    plan.check_budgets()
    assert sum(s.budget_s for s in plan.PLAN) + plan.OVERHEAD_S <= 480
    assert sum(s.dry_budget_s for s in plan.PLAN) + plan.OVERHEAD_S <= 120
    assert [s.name for s in plan.PLAN[:2]] == ["kit", "setup"] and all(s.budget_s > 0 for s in plan.PLAN[:2])
    assert [s.name for s in plan.PLAN if s.kind == "tests"] == ["cuda-tests", "kernel-tests"]
    with pytest.raises(ValueError, match="GPU budgets"):
        plan.check_budgets(plan.PLAN + (plan.Stage("extra", "", 60, 0, ()),))


def test_plan_reads_the_targets_where_its_benchmarks_measure_them():
    stage = {s.name: s for s in plan.PLAN}
    attention = stage["attention-targets"].steps[0].gpu
    assert attention[attention.index("--N") + 1] == "588,1225"
    assert attention[attention.index("--features") + 1] == "512"
    assert attention[attention.index("--dtype") + 1] == "bfloat16"
    losses = stage["loss-targets"].steps[0].gpu
    assert losses[losses.index("--B") + 1] == "8192" and losses[losses.index("--D") + 1] == "512"
    assert plan.GPU_POINTS.attention_N == (588, 1225) and plan.GPU_POINTS.loss_B == 8192


def test_plan_runs_in_order_of_value():
    assert [s.name for s in plan.PLAN] == ["kit", "setup", "cuda-tests", "kernel-tests", "attention-targets",
                                         "loss-targets", "e2e", "flow", "loader", "dali", "grid"]
    stage = {s.name: s for s in plan.PLAN}
    # e2e comes before loader and dali: it makes the rawframes they read
    assert "--make-into" in stage["e2e"].steps[0].argv and "bench.bench_e2e" in stage["e2e"].steps[1].argv
    assert [s.name for s in plan.PLAN if s.opencv] == ["cuda-tests", "kernel-tests", "flow"]


BARE = REPO / "bench" / "bare_image"


def bare_env(**extra):
    """The environment of a Python that lacks what the bare GPU image lacks (bench/bare_image)."""
    return dict(os.environ, PYTHONPATH=str(BARE), **extra)


def test_bare_image_blocker_hides_what_the_gpu_machines_lack():
    probe = ("import importlib.util, cv2, torch\n"
             "print(importlib.util.find_spec('av'), importlib.util.find_spec('nvidia.dali'), hasattr(cv2, 'optflow'))\n"
             "for name in ('av', 'nvidia.dali', 'cv2.optflow', 'pytorch_metric_learning'):\n"
             "    try:\n"
             "        __import__(name)\n"
             "        print('imported', name)\n"
             "    except ModuleNotFoundError:\n"
             "        pass\n"
             "print('resize' in dir(cv2), torch.zeros(2).sum().item())\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=bare_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["None", "None", "False", "True", "0.0"], proc.stdout


@pytest.mark.slow
def test_dry_run_writes_summary_and_rows(tmp_path):
    """The dry run on the bare GPU image's package set (bench/bare_image hides PyAV, DALI and
    cv2.optflow): a stage that imports one of them without a skip fails here."""
    results = REPO / "bench" / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "bench.gpu", "--dry-run", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=600, env=bare_env())
    stages_table = "".join(line + "\n" for line in proc.stdout.splitlines() if line.startswith("["))
    assert proc.returncode == 0, stages_table + proc.stderr[-4000:]
    summaries = list(tmp_path.glob("gpu-summary-*.md"))
    assert len(summaries) == 1
    text = summaries[0].read_text()
    assert "## SPEC §8 targets" in text and "## Kernel rows" in text and "## Optical flow" in text
    for name in ("cross_attention", "losses", "loader", "e2e", "flow", "gpu"):
        files = list(tmp_path.glob(f"{name}-*.json"))
        assert len(files) == 1 and json.loads(files[0].read_text()), name
    stages = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    status = {r["name"]: r["status"] for r in stages}
    assert status == {s.name: "skipped" if s.name in ("kit", "dali") else "ok" for s in plan.PLAN}, status
    # flow without cv2.optflow: tvl1-torch's figures taken, OpenCV's parts skipped naming the package
    flow = {r["name"]: r for r in stages}["flow"]
    assert [s.split(":")[0] for s in flow["skipped"]] == ["agreement", "opencv"]
    assert all("opencv-contrib-python-headless" in s for s in flow["skipped"])
    assert "Not measured for a missing package" in text and "opencv-contrib-python-headless" in text
    rows = json.loads(next(tmp_path.glob("flow-*.json")).read_text())
    kinds = [r["kind"] for r in rows]
    assert "speed" in kinds and kinds.count("device-agreement") == 8 and "agreement" not in kinds
    assert all(r["opencv_tvl1"] is False for r in rows)
    # nothing of the dry run's (the files it wrote, named after this CPU) went into bench/results/
    # (other jobs sharing the checkout may write other results there meanwhile)
    written = {p.name for p in tmp_path.glob("*.json")} | {summaries[0].name}
    touched = [p.name for p in results.iterdir() if p.name in written and before.get(p.name) != p.stat().st_mtime_ns]
    assert not touched


def test_overrun_stage_is_stopped_and_keeps_its_rows(tmp_path):
    writer = ("import json, sys, time, pathlib; p = pathlib.Path(sys.argv[1]) / 'toy-cpu.json'; "
              "p.write_text(json.dumps([{'x': 1}, {'x': 2}])); print('two rows', flush=True); time.sleep(60)")
    stage = plan.Stage("toy", "writes two rows, then hangs", budget_s=2, dry_budget_s=2,
                      steps=(plan.Step(("{python}", "-c", writer, "{out}")),))
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=time.monotonic() + 60)
    start = time.monotonic()
    result = runner.run_stage(stage, run)
    assert time.monotonic() - start < 2 + runner.KILL_GRACE_S + 5
    assert result.status == "timeout" and result.rows == {"toy-cpu.json": 2}
    log = (tmp_path / "toy.log").read_text()
    assert "two rows" in log and "time budget ran out" in log


def test_failing_command_fails_the_stage_and_later_steps_still_run(tmp_path):
    stage = plan.Stage("toy", "", budget_s=30, dry_budget_s=30, steps=(
        plan.Step(("{python}", "-c", "raise SystemExit(3)")),
        plan.Step(("{python}", "-c", "print('second step ran')")),
    ))
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=time.monotonic() + 60)
    result = runner.run_stage(stage, run)
    assert result.status == "failed" and result.rc == 3
    assert "second step ran" in (tmp_path / "toy.log").read_text()


def test_wheels_already_installed_are_left_alone(tmp_path):
    for name in ("pytest-8.0.0-py3-none-any.whl", "not_a_real_distribution-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=0)
    assert [Path(w).name for w in run.wheels_to_install()] == ["not_a_real_distribution-1.0-py3-none-any.whl"]
    setup = {s.name: s for s in plan.PLAN}["setup"]
    assert run.resolve(setup.steps[0])[-2:] == [str(tmp_path / "not_a_real_distribution-1.0-py3-none-any.whl"),
                                                       "--dry-run"]
    empty = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                    wheelhouse=tmp_path / "missing", deadline=0)
    assert empty.resolve(setup.steps[0]) is None  # no wheelhouse: the step is left out


def test_pytest_log_counts_a_run_cut_short():
    log = "\n".join([
        "tests/test_a.py::test_one[bf16-7] PASSED                       [ 10%]",
        "tests/test_a.py::test_two FAILED                               [ 20%]",
        "tests/test_a.py::test_three SKIPPED (needs CUDA)               [ 30%]",
        "[bench.gpu] stopped: the stage's time budget ran out after 50 s",
    ])
    counts = logs.parse_pytest_log(log)
    assert (counts["passed"], counts["failed"], counts["skipped"]) == (1, 1, 1)
    assert counts["failing"] == ["tests/test_a.py::test_two"]
    assert logs.parse_pytest_log("=== 115/127 tests collected (12 deselected) in 1.2s ===")["collected"] == 115
    # a test file that does not import (a package the machine lacks) is an error of its stage
    collection = logs.parse_pytest_log("ERROR tests/test_sampling.py\n!!! Interrupted: 1 error during collection !!!")
    assert collection["error"] == 1 and collection["failing"] == ["tests/test_sampling.py"]


def test_device_peaks_by_name():
    assert targets.device_peak("NVIDIA H100 80GB HBM3") == (989.0, 3350.0)
    assert targets.device_peak("NVIDIA H200") == (989.0, 4800.0)
    assert targets.device_peak("NVIDIA H100 PCIe") == (756.0, 2000.0)
    assert targets.device_peak("AMD EPYC (2 cores)") is None


def test_loss_minimal_bytes():
    # cross-modal, bf16, B=8192, D=512: two embeddings read, two gradients written, labels, loss, grad_output
    embeddings = 2 * 8192 * 512 * 2
    assert targets.loss_min_bytes("cross_modal_triplet_loss", "full", 8192, 512, "bfloat16") == 2 * embeddings + 8 * 8192 + 8
    assert targets.loss_min_bytes("discriminative_embedding_loss", "fwd", 8, 4, "float32") == 8 * 4 * 4 + 64 + 4


def test_targets_from_rows():
    p = plan.GPU_POINTS
    base = dict(op="cross_stream_attention", mode="full", dtype="bfloat16", B=32, d=512, e=512)

    def att(provider, n, ms, mem=None):
        return dict(base, provider=provider, N_f=n, N_o=n, ms_p50=ms, peak_mem_bytes=mem,
                    tflops=2 * 32 * n * n * 9 * 512 / (ms * 1e-3) / 1e12)

    attention = [att("triton", 588, 1.0, 6 * 32 * 588 * 512 * 2), att("eager", 588, 4.0), att("compile", 588, 1.2),
                 att("sdpa", 588, 1.1), att("triton", 1225, 4.0, 6 * 32 * 1225 * 512 * 2), att("eager", 1225, 20.0)]
    losses = [dict(op="cross_modal_triplet_loss", provider=prov, mode="full", dtype="bfloat16", B=8192, D=512,
                   ms_p50=ms, peak_mem_bytes=mem) for prov, ms, mem in (("triton", 1.0, 10), ("eager", 6.0, 1000))]
    e2e = [dict(case="ccs-synthetic", clips_per_s=95.0), dict(case="backbones-synthetic", clips_per_s=100.0)]
    verdicts = {t: v for t, _, v in targets.evaluate_targets(p, attention, losses, [], e2e, (989.0, 4800.0))}
    assert verdicts["cross_stream_attention fwd+bwd at N = 588, e = 512: ≥ 3× eager"] == "pass"
    assert verdicts["cross_stream_attention fwd+bwd at N = 588, e = 512: ≥ 1.5× torch.compile"] == "**fail**"
    assert verdicts["cross_stream_attention fwd+bwd at N = 1225, e = 512: ≥ 1.5× torch.compile"] == "—"
    assert verdicts["cross_modal_triplet_loss fwd+bwd at B = 8192, D = 512: ≥ 5× eager"] == "pass"
    assert verdicts["cross_modal_triplet_loss at B = 8192, D = 512: peak memory ≤ 1/10 of eager"] == "pass"
    assert verdicts["(b)/(c) ≥ 0.90: CCS cost over the backbones"] == "pass"
    assert verdicts["(a)/(b) ≥ 0.95: the loader never the bottleneck"] == "—"
    memory = [v for t, _, v in targets.evaluate_targets(p, attention, losses, [], e2e, None) if "O(B·N·e)" in t]
    assert memory == ["pass"]


def test_failing_tests_fail_the_run_even_when_their_stage_ran_out_of_time():
    counts = dict(passed=3, failed=1, error=0, skipped=0, failing=["tests/test_a.py::test_two"])
    results = [runner.StageResult("kernel-tests", "timeout", tests=counts), runner.StageResult("e2e", "timeout"),
               runner.StageResult("grid", "ok")]
    assert cli.failed_stages(results, dry_run=False) == ["kernel-tests"]
    assert cli.failed_stages(results, dry_run=True) == ["kernel-tests", "e2e"]


def test_dry_budgets_stretch_with_load_only(monkeypatch):
    monkeypatch.setattr(plan.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert plan.dry_run_stretch() == 1.0
    monkeypatch.setattr(plan.os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    monkeypatch.setattr(plan.os, "cpu_count", lambda: 2)
    assert plan.dry_run_stretch() == 2.5
    stage = {s.name: s for s in plan.PLAN}["e2e"]
    run = runner.Run(dry_run=False, python="", out=Path(), work=Path(), logs=Path(), wheelhouse=Path(), deadline=0)
    assert run.budget(stage) == stage.budget_s


def test_flow_stage_and_targets_from_rows():
    stage = {s.name: s for s in plan.PLAN}["flow"]
    argv = stage.steps[0].argv + stage.steps[0].gpu
    assert "bench.bench_flow" in argv and "cpu" in argv[argv.index("--skip") + 1]
    assert "tests/dataloader/test_tvl1.py" in plan.KERNEL_TESTS
    size = dict(height=256, width=340)
    rows = [dict(kind="agreement", pair="translate-int", epe_ratio=1.02, within_2_levels=0.99, **size),
            dict(kind="agreement", pair="synth-a", within_2_levels=0.97, **size),
            dict(kind="speed", provider="opencv x16 processes", flow_device="cpu", pairs_per_s=12.0, **size),
            dict(kind="speed", provider="tvl1-torch triton", flow_device="cuda", batch=64, pairs_per_s=250.0, **size)]
    verdicts = {t: (m, v) for t, m, v in targets.flow_targets(rows)}
    speed = verdicts["tvl1-torch (Triton iteration) ≥ 300 pairs/s at 340×256 on one GPU"]
    assert speed[1] == "**fail**" and "250.0 pairs/s" in speed[0] and "OpenCV on every core 12.0" in speed[0]
    assert verdicts["tvl1-torch EPE against the ground truth ≤ 1.1× OpenCV's on every synthetic pair"][1] == "pass"
    within = verdicts["tvl1-torch ≥ 95 % of pixels within ±2 uint8 levels of OpenCV (bound 20) on every pair"]
    assert within == ("min 97.0 % (synth-a, 2 pairs)", "pass")
    assert [v for _, _, v in targets.flow_targets([])] == ["—"] * 5


def test_flow_part_that_fails_keeps_the_next_parts_rows(tmp_path, monkeypatch, capsys):
    """bench_flow: the speed part failing (first) leaves the device agreement's rows, exit 1;
    without cv2.optflow OpenCV's parts are skipped naming the package."""
    from bench import bench_flow

    def broken(*args, **kwargs):
        raise RuntimeError("speed part broken on purpose")

    monkeypatch.setattr(bench_flow, "torch_speed_rows", broken)
    monkeypatch.setattr(bench_flow, "opencv_tvl1_missing", lambda: "needs opencv-contrib-python-headless")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rc = bench_flow.main(["--device", "cpu", "--height", "24", "--width", "32", "--pairs", "1", "--batch", "1",
                          "--params", plan.FLOW_DRY_PARAMS, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1 and "failed speed cpu" in out and "failed parts: speed cpu" in out
    rows = json.loads(next(tmp_path.glob("flow-*.json")).read_text())
    assert [r["kind"] for r in rows] == ["device-agreement"] * 8
    assert rows[0]["tvl1_params"] == {"nscales": 1, "warps": 1, "outerIterations": 1, "innnerIterations": 2}
    assert logs.parse_skips(out) == ["agreement: OpenCV's TV-L1 (needs opencv-contrib-python-headless)",
                                    "opencv: OpenCV's TV-L1 (needs opencv-contrib-python-headless)"]


def test_device_agreement_target_from_rows():
    def row(pair, impl, within, same=1.0, identical=False):
        return dict(kind="device-agreement", pair=pair, impl=impl, flow_device="cuda", within_1_level=within,
                    same_levels=same, identical=identical, max_abs_diff_px=0.01, epe_ours=0.05)

    rows = [row("translate-int", "triton", 1.0, identical=True), row("zoom-1.02", "triton", 0.995, 0.97),
            row("translate-int", "eager", 0.97)]
    verdicts = {t.split(" against")[0]: (m, v) for t, m, v in targets.flow_targets(rows)}
    triton = verdicts["tvl1-torch on the GPU (triton iteration)"]
    assert triton[1] == "pass" and "min 99.50 % (zoom-1.02, 2 pairs, cuda)" in triton[0]
    assert "equal levels ≥ 97.00 %" in triton[0] and "1 pairs bit-identical" in triton[0]
    assert verdicts["tvl1-torch on the GPU (eager iteration)"][1] == "**fail**"


def test_skip_lines_name_what_a_stage_left_out(tmp_path):
    log = ("appended 2 rows\nskip agreement: OpenCV's TV-L1 (needs opencv-contrib-python-headless)\n"
           "skip dali-gpu: nvidia-dali is not installed\n"
           "skip agreement: OpenCV's TV-L1 (needs opencv-contrib-python-headless)\n"
           "  skip this: indented lines are not skip lines\n")
    assert logs.parse_skips(log) == ["agreement: OpenCV's TV-L1 (needs opencv-contrib-python-headless)",
                                    "dali-gpu: nvidia-dali is not installed"]
    stage = plan.Stage("toy", "", budget_s=30, dry_budget_s=30, steps=(
        plan.Step(("{python}", "-c", "print('skip opencv: needs opencv-contrib-python-headless')")),))
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=time.monotonic() + 60)
    result = runner.run_stage(stage, run)
    assert result.status == "ok" and result.skipped == ["opencv: needs opencv-contrib-python-headless"]
    assert "opencv-contrib-python-headless" in result.note


def test_kit_paths_reach_the_stages_that_need_them(tmp_path, monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    run = runner.Run(dry_run=True, python=sys.executable, out=tmp_path, work=tmp_path, logs=tmp_path,
                  wheelhouse=tmp_path, deadline=0, kit_target=tmp_path / "kit")
    stage = {s.name: s for s in plan.PLAN}
    run.load_kit()  # the kit stage wrote no report: nothing added
    assert "PYTHONPATH" not in run.env(stage["flow"])
    (tmp_path / "kit").mkdir()
    (tmp_path / "kit" / "kit.json").write_text(json.dumps({"pythonpath": ["/k/site"], "cv2_path": "/k/cv2",
                                                           "installed": [], "lines": []}))
    run.load_kit()
    assert run.env(stage["flow"])["PYTHONPATH"] == "/k/cv2:/k/site"
    assert run.env(stage["kernel-tests"])["PYTHONPATH"] == "/k/cv2:/k/site"
    assert run.env(stage["e2e"])["PYTHONPATH"] == "/k/site"  # the loader figures keep the machine's OpenCV
    monkeypatch.setenv("PYTHONPATH", "/mine")
    assert run.env(stage["e2e"])["PYTHONPATH"] == "/k/site:/mine"


def test_dry_budgets_grow_when_the_load_grows_during_the_run(tmp_path, monkeypatch):
    loads = iter([1.0, 1.0, 3.0, 2.0])  # at the start, then before each of the three stages
    monkeypatch.setattr(cli, "dry_run_stretch", lambda: next(loads))
    toy_plan = tuple(plan.Stage(name, "", 10, 4, (plan.Step(("{python}", "-c", "pass")),)) for name in ("a", "b", "c"))
    monkeypatch.setattr(cli, "PLAN", toy_plan)
    assert cli.main(["--dry-run", "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("gpu-*.json")).read_text())
    assert [(r["name"], r["stretch"]) for r in rows] == [("a", 1.0), ("b", 3.0), ("c", 3.0)]
    assert rows[1]["budget_s"] == pytest.approx(12, abs=0.5)


def test_summary_is_written_after_every_stage(tmp_path, monkeypatch):
    """A run cut off in its third stage leaves a summary with the figures of the first two."""
    def writer(name, clips):
        src = tmp_path / f"{name}.json"
        src.write_text(json.dumps([{"backend": "torch", "clips_per_s": clips, "device": "cpu"}]))
        return plan.Step(("{python}", "-c", "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])",
                         str(src), "{out}/loader-toy.json"))

    out = tmp_path / "out"
    toy_plan = (plan.Stage("first", "", 10, 10, (writer("first", 12.5),)),
            plan.Stage("second", "", 10, 10, (plan.Step(("{python}", "-c", "print('skip opencv: needs opencv-contrib')")),)),
            plan.Stage("third", "", 10, 10, (writer("third", 99.0),)))
    monkeypatch.setattr(cli, "PLAN", toy_plan)
    real_run_stage = runner.run_stage

    def cut_off_at_third(stage, run):
        if stage.name == "third":
            raise KeyboardInterrupt  # the machine taken back, the session's time spent
        return real_run_stage(stage, run)

    monkeypatch.setattr(cli, "run_stage", cut_off_at_third)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["--dry-run", "--out", str(out)])
    text = next(out.glob("gpu-summary-*.md")).read_text()
    assert "| `first` | ok |" in text and "| `second` | ok |" in text and "| `third` | not run yet |" in text
    assert "torch DataLoader 12.5 clips/s" in text and "99.0" not in text
    assert "`second`: opencv: needs opencv-contrib" in text
    stages = json.loads(next(out.glob("gpu-*.json")).read_text())
    assert [r["name"] for r in stages] == ["first", "second"]
