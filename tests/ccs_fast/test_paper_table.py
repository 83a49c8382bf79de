"""Paper-shaped Markdown tables: Table 1 (splits and their mean) and Table 3 (variants)."""
import random

import pytest

from ccs_fast.paper_table import mean_over_splits, table1_markdown, table3_markdown


def _result(rng):
    def stream():
        top1 = rng.random()
        return {"top1": top1, "top5": top1 + (1 - top1) * rng.random()}
    return {"rgb": stream(), "flow": stream(), "fused": stream(), "num_videos": rng.randrange(10, 4000)}


def _rows(markdown):
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def test_table1_splits_and_mean():
    rng = random.Random()
    splits = {f"split {i}": _result(rng) for i in (1, 2, 3)}
    rows = _rows(table1_markdown(splits, title="UCF-101", protocol="25 segments × 10 crops"))
    assert rows[0] == ["Split", "RGB top-1", "RGB top-5", "Flow top-1", "Flow top-5", "RGB+Flow top-1",
                       "RGB+Flow top-5", "Videos"]
    assert [r[0] for r in rows[2:]] == ["split 1", "split 2", "split 3", "**Mean (3 splits)**"]
    assert rows[3][3] == f"{100 * splits['split 2']['flow']['top1']:.1f}"
    assert rows[2][7] == str(splits["split 1"]["num_videos"])
    mean_fused_top5 = sum(s["fused"]["top5"] for s in splits.values()) / 3
    assert rows[5][6] == f"{100 * mean_fused_top5:.1f}" and rows[5][7] == "–"
    assert mean_over_splits(splits)["fused"]["top5"] == pytest.approx(mean_fused_top5)
    text = table1_markdown(splits, protocol="25 segments × 10 crops")
    assert "Protocol: 25 segments × 10 crops" in text


def test_table1_single_split_has_no_mean_row():
    rows = _rows(table1_markdown({"split 1": _result(random.Random())}))
    assert len(rows) == 3 and not any("Mean" in r[0] for r in rows)
    with pytest.raises(ValueError, match="no split"):
        table1_markdown({})


def test_table3_variant_order_seed_and_wall_time():
    rng = random.Random()
    results = {name: _result(rng) for name in ("all", "extra", "cs", "baseline", "cb")}
    results["cs"]["seed"] = 7
    results["all"]["wall_s"] = 1500.0
    rows = _rows(table3_markdown(results, seed=0, wall_times={"baseline": 42.4, "cb": 61.0}))
    assert rows[0] == ["Variant", "Setting", "RGB", "Flow", "RGB+Flow", "Seed", "Wall time"]
    assert [r[0] for r in rows[2:]] == ["`baseline`", "`cb`", "`cs`", "`all`", "`extra`"]
    baseline = rows[2]
    assert baseline[2:5] == [f"{100 * results['baseline'][s]['top1']:.1f}" for s in ("rgb", "flow", "fused")]
    assert baseline[5:] == ["0", "42 s"]
    assert rows[4][5] == "7" and rows[5][6] == "25.0 min" and rows[6][6] == "–"


def test_table3_accepts_the_demo_short_form():
    rows = _rows(table3_markdown({"baseline": {"rgb": 0.3426, "flow": 0.3148, "fused": 0.2778},
                                  "all": {"rgb": 1.0, "flow": 1.0, "fused": 1.0}}, seed=0))
    assert rows[2][2:5] == ["34.3", "31.5", "27.8"] and rows[3][2:5] == ["100.0", "100.0", "100.0"]
