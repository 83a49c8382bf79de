"""The demo (ccs_fast/demo.py): a shrunken run whose CCS must beat two-stream, its lines, and
the CPU plan it trains under."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ccs_fast.demo import _LinePrefix, run_demo

# The demo recipe (configs/demo.yaml: optimizer, schedule shape, block after stage 2, the
# losses) on a shrunken data set: 2 classes (appearance x motion is then an XOR), 16 training
# and 16 test videos per cell at 40 px, a 0.5 M-parameter backbone and 16 epochs of 8 steps.
# 64 test videos keep a chance-level stream within chance + 0.15 = 0.65 (2.4 standard
# deviations of a binomial at 0.5) on any floating-point trajectory; with 24 a baseline stream
# reached 0.667 on two of six seeds. Measured (one intra-op thread per variant): `all` 1.000 in
# every column on seeds 0, 1, 4 and 5, `baseline` 0.406-0.563 on every stream (chance 0.5);
# about 10 s on the idle 2-core machine.
SHRUNKEN_DATA = dict(classes=2, videos_per_cell=16, val_videos_per_cell=16, frames=12, size=40, flow="farneback")
SHRUNKEN_CONFIG = {"model.backbone": "timm:test_resnet", "model.num_classes": 2, "model.embed_dim": 32,
                   "optim.epochs": 16, "optim.lr_steps": [15], "data.input_size": 32, "data.batch_size": 8,
                   "data.classes_per_batch": 2, "data.eval_batch_size": 8, "train.tensorboard": False}


def test_shrunken_demo_ccs_beats_two_stream(tmp_path, capfd):
    """The convergence guard of the demo recipe: `all` >= 0.95 RGB+Flow and `baseline` within
    chance + 0.15 on every stream, trained side by side with one intra-op thread each; one
    line per variant and epoch with an ETA, and a closing line with the Table 3 row and the
    report's path."""
    out = tmp_path / "demo"
    report = run_demo(out, seed=0, threads=1, pictures=False, dataset=SHRUNKEN_DATA,
                      config_overrides=SHRUNKEN_CONFIG)
    chance = report["chance"]
    assert chance == 0.5
    assert report["variants"]["all"]["fused"] >= 0.95
    assert all(report["variants"]["baseline"][s] <= chance + 0.15 for s in ("rgb", "flow", "fused"))
    assert report["threads"] == 1
    stdout = capfd.readouterr().out
    assert re.search(r"^\[demo\] variants baseline, all, seed 0; CPU plan: \d+ core\(s\) available", stdout, re.M)
    for variant in ("baseline", "all"):
        epochs = re.findall(rf"^\[{variant}\] \[train\] epoch (\d+)/16 step 8/8: .* ETA \S+$", stdout, re.M)
        assert epochs == [str(e) for e in range(1, 17)]
        assert re.search(rf"^\[{variant}\] \[eval\] {variant}: top-1 RGB [\d.]+ Flow [\d.]+ RGB\+Flow [\d.]+ "
                         r"\(train \S+, eval \S+\)$", stdout, re.M)
    last = stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("[demo] done in ") and last.endswith(f"report: {out / 'report.md'}")
    fused = report["variants"]["all"]["fused"]
    assert f"all RGB {report['variants']['all']['rgb']:.3f} Flow " in last and f"RGB+Flow {fused:.3f}" in last
    saved = json.loads((out / "report.json").read_text())
    assert saved["variants"] == report["variants"] and saved["plan"].startswith("CPU plan:")


def test_line_prefix_keeps_lines_whole():
    sink = io.StringIO()
    stream = _LinePrefix(sink, "[all] ")
    stream.write("epoch 1")
    assert sink.getvalue() == ""  # nothing until the line is complete
    stream.write(" done\nepoch 2\nepo")
    stream.write("ch 3\n")
    assert sink.getvalue() == "[all] epoch 1 done\n[all] epoch 2\n[all] epoch 3\n"
    assert not stream.isatty()


def test_demo_threads_must_be_positive(tmp_path, capsys):
    from ccs_fast.cli import main

    assert main(["demo", "--out", str(tmp_path / "x"), "--threads", "0"]) == 2
    assert capsys.readouterr().err == "ccs-fast: error: --threads must be at least 1, got 0\n"
    assert not (tmp_path / "x").exists()


KILLED_DEMO = """
import sys
sys.path.insert(0, {tests!r})
from test_demo import SHRUNKEN_CONFIG, SHRUNKEN_DATA
from ccs_fast.demo import run_demo

if __name__ == "__main__":
    run_demo(sys.argv[1], seed=0, threads=1, pictures=False, dataset=SHRUNKEN_DATA,
             config_overrides={{**SHRUNKEN_CONFIG, "optim.epochs": 200}})
"""


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc: Linux")
def test_a_killed_demo_takes_its_variant_processes_with_it(tmp_path):
    """The variants train in processes of their own; a demo killed outright (kill -9, a
    scheduler's SIGKILL) must not leave them training or waiting for a parent that is gone."""
    driver = tmp_path / "killed_demo.py"
    driver.write_text(KILLED_DEMO.format(tests=str(Path(__file__).parent)))
    log = tmp_path / "demo.log"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(driver), str(tmp_path / "out")], stdout=sink,
                                stderr=subprocess.STDOUT, env=env)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not (
                "[all] [train] epoch" in log.read_text() and "[baseline] [train] epoch" in log.read_text()):
            time.sleep(0.2)
        text = log.read_text()
        assert "[all] [train] epoch" in text and "[baseline] [train] epoch" in text, text[-2000:]
        workers = [pid for pid in _children(proc.pid)
                   if "spawn_main" in open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
                   and "resource_tracker" not in open(f"/proc/{pid}/cmdline").read()]
        assert len(workers) == 2
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(os.path.exists(f"/proc/{pid}") and _children_state(pid) != "Z" for pid in workers) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(os.path.exists(f"/proc/{pid}") and _children_state(pid) != "Z" for pid in workers)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _children_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
