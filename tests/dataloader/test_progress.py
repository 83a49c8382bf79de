"""dataloader.progress: one progress helper for every long step (issue 22 #5): a bar on a
terminal; in a log file a line at least every ``interval`` seconds with counts, a rate in
readable units and an ETA as h:mm:ss, whether or not work finished in between."""
import io
import random
import re
import time

import pytest

from ccs_fast.dataloader.progress import Progress, format_clock, format_rate

LINE = re.compile(r"^eval: (\d+)/(\d+) videos \((?:(\d+(?:\.\d+)?) videos/(s|min|h), ETA (\d+):(\d\d):(\d\d)"
                  r"|none done yet after \d+:\d\d:\d\d; no rate or ETA yet)\)$")


def test_clock_and_rate_units():
    assert format_clock(0) == "0:00:00" and format_clock(245.4) == "0:04:05"
    assert format_clock(100000) == "27:46:40"
    assert format_rate(6, 2, "pairs") == "3.00 pairs/s"
    assert format_rate(3, 60, "videos") == "3.00 videos/min"  # 0.05/s reads as 3 a minute
    assert format_rate(2, 3600, "videos") == "2.00 videos/h"
    assert format_rate(1, 36000, "videos") == "0.10 videos/h"
    assert format_rate(250, 1, "pairs") == "250 pairs/s"


def test_log_file_gets_timed_lines_with_counts_rate_and_eta():
    stream = io.StringIO()  # not a terminal
    total = random.randint(5, 9)
    with Progress(total, "eval", stream=stream, interval=0.05) as bar:
        time.sleep(0.12)  # nothing done yet: lines still come, without a rate
        for _ in range(total):
            time.sleep(0.03)
            bar.update()
        time.sleep(0.12)  # the timer keeps reporting between updates
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) >= 4
    for line in lines[:-1]:
        match = LINE.match(line)
        assert match, line
        assert int(match.group(2)) == total
        if match.group(3):
            assert float(match.group(3)) > 0 and match.group(4) in ("s", "min", "h")
    assert "none done yet" in lines[0]
    assert re.fullmatch(rf"eval: {total}/{total} videos \(\d+\.\d+ videos/s, 0:00:0\d in all\)", lines[-1])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_gets_a_bar_and_no_timed_lines():
    stream = _Terminal()
    with Progress(4, "predict", unit="pairs", stream=stream, interval=0.01) as bar:
        for _ in range(4):
            bar.update()
            time.sleep(0.02)
    text = stream.getvalue()
    assert "\r" in text and "4/4" in text and "ETA" not in text and "in all" not in text


def test_disabled_is_silent():
    stream = io.StringIO()
    with Progress(3, "eval", stream=stream, enabled=False, interval=0.01) as bar:
        bar.update(3)
        time.sleep(0.03)
    assert stream.getvalue() == ""


def test_eval_and_predict_show_progress(tiny_config, tmp_path, capsys):
    """``ccs-fast eval`` and ``predict --list`` report the videos done on stderr."""
    pytest.importorskip("timm")
    from ccs_fast.checkpoint import save_checkpoint
    from ccs_fast.evaluate import evaluate_checkpoint
    from ccs_fast.model import build_model
    from ccs_fast.predict import predict_list

    cfg = tiny_config(tmp_path)
    path = save_checkpoint(tmp_path / "last.pt", build_model(cfg.model), config=cfg.to_dict())
    evaluate_checkpoint(None, path, progress=True)
    assert re.search(r"^eval the eval split: 8/8 videos \(.* in all\)$", capsys.readouterr().err, re.M)
    predict_list(cfg, path, None, tmp_path / "p.jsonl", progress=True)
    assert re.search(r"^predict .*: 8/8 videos \(.* in all\)$", capsys.readouterr().err, re.M)
