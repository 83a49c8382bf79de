"""Metrics: JSON lines, TensorBoard events, rank-0-only writing, top-k counts, run ids,
truncation on resume, write errors."""
import errno
import json
import os

import numpy as np
import pytest
import torch

from ccs_fast.metrics import (DROPPED_METRICS_FILE, METRICS_FILE, TENSORBOARD_DIR, MetricsLogger,
                              MetricsWriteError, Progress, Throughput, flatten_metrics, read_metrics,
                              confusion_counts, topk_correct, truncate_metrics)


def test_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLogger(tmp_path, enabled=True, tensorboard=True) as logger:
        logger.log("train", 10, {"loss": 1.5, "lr": 0.01}, epoch=1)
        logger.log("val", 10, flatten_metrics({"fused": {"top1": 0.5}, "num_videos": 4}), epoch=1)
        logger.log("train", 20, {"loss": float("nan")}, epoch=2)
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["split"] for r in records] == ["train", "val", "train"]
    assert records[0]["loss"] == 1.5 and records[0]["epoch"] == 1 and records[0]["step"] == 10
    assert records[1]["fused_top1"] == 0.5 and records[1]["num_videos"] == 4
    assert records[2]["loss"] == "nan"  # valid JSON, still readable
    for line in (tmp_path / METRICS_FILE).read_text().splitlines():
        json.loads(line)
    events = list((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "rank1", enabled=False)
    logger.log("train", 1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "rank1").exists()


def test_topk_correct_and_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(scores, labels, (1, 2, 5)).tolist() == [1.0, 2.0, 3.0]


def test_flatten_metrics():
    assert flatten_metrics({"rgb": {"top1": 1, "top5": 2}, "n": 3}) == {"rgb_top1": 1, "rgb_top5": 2, "n": 3}


def test_progress_and_throughput():
    bar = Progress(3, "epoch", enabled=False)
    bar.update()
    bar.show(loss=1.0)
    bar.close()
    meter = Throughput()
    meter.add(64)
    assert meter.rate() > 0


def test_every_record_carries_the_run_id(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, run_id="run-a") as logger:
        logger.log("train", 1, {"loss": 1.0})
        logger.log("val", 1, {"fused_top1": 0.5})
    assert [r["run_id"] for r in read_metrics(tmp_path / METRICS_FILE)] == ["run-a", "run-a"]


def test_truncate_to_the_checkpoint_step(tmp_path):
    """Issue 11 #3: a killed epoch's records must not stay beside the resumed ones."""
    path = tmp_path / METRICS_FILE
    rows = [("info", 0), ("train", 2), ("train_epoch", 2), ("val", 2), ("train", 4), ("val", 4)]
    path.write_text("".join(json.dumps({"split": s, "step": n}) + "\n" for s, n in rows) + '{"split": "tr')
    assert truncate_metrics(tmp_path, 2) == 3  # two later records and the unfinished line
    assert [(r["split"], r["step"]) for r in read_metrics(path)] == rows[:4]
    dropped = (tmp_path / DROPPED_METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in dropped[:2]] == [4, 4] and dropped[2] == '{"split": "tr'
    assert truncate_metrics(tmp_path, 2) == 0 and truncate_metrics(tmp_path / "none", 2) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [DROPPED_METRICS_FILE, METRICS_FILE]


class _FullDisk:
    """A file whose writes fail as on a full disk."""

    def write(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = lambda self: None


def test_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """Issue 11 #4: a full disk on metrics.jsonl ended in a traceback."""
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger._file.close()
    logger._file = _FullDisk()
    with pytest.raises(MetricsWriteError) as info:
        logger.log("train", 1, {"loss": 1.0})
    assert str(info.value) == f"{tmp_path / METRICS_FILE}: disk full (no space left on device) while writing metrics"
    logger.close()


def test_confusion_counts_by_hand():
    scores, labels = torch.randn(200, 5), torch.randint(-1, 5, (200,))  # -1: a label-less video
    expected = np.zeros((5, 5))
    for t, p in zip(labels.tolist(), scores.argmax(-1).tolist()):
        if t >= 0:
            expected[t, p] += 1
    counts = confusion_counts(scores, labels)
    assert counts.dtype == torch.float64
    np.testing.assert_array_equal(counts.numpy(), expected)
