"""`kdcache bench --quick` runs every benchmark; its output is checked for shape, never for speed."""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_kdcache


@pytest.mark.slow
def test_quick_bench_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    p = run_kdcache("bench", "--quick", "--reps", "1", "--json", str(out), timeout=900)
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["reps"] == 1
    assert {row["backend"] for row in r["store_read"]} == {"zarr", "hdf5"}
    assert all(row["block_ratio"] > 0 and row["stream_ratio"] > 0 for row in r["store_read"])
    assert [row["teacher"] for row in r["dump"]["ratio"]] == ["mnist 1200-1200", "3-member ensemble"]
    assert len(r["dump"]["memory"]["peak_rss_MiB"]) == 2
    assert r["train"]["ratio"] > 0 and [row["students"] for row in r["sweep"]] == [10, 4]
    assert [row["K"] for row in r["online"]["by_K"]] == [1, 4, 16]
    assert all(row["cached_s_per_student"] > 0 for row in r["online"]["by_K"])
    assert {row["dtype"] for row in r["storage"]} == {"float16", "float32"}
    assert [row["layout"] for row in r["hf"]["rows"]] == ["dense", "topk k=20"]
    assert all(row["ratio"] > 0 and row["bytes_per_token"] > 0 for row in r["hf"]["rows"])
    assert [row["layout"] for row in r["hf"]["trainer"]["rows"]] == ["dense", "topk k=20"]
    assert all(row["distil_step_s"] > 0 and row["plain_step_s"] > 0 for row in r["hf"]["trainer"]["rows"])
    v = r["views"]
    assert v["dump_per_view_over_bare_pass"] > 0 and [row["K"] for row in v["by_K"]] == [1, 4]
    assert [row["layout"] for row in v["sizes"]] == ["dense", "topk k=3"]
    assert all(row["bytes_per_sample_per_view"] > 0 for row in v["sizes"])
    if "skipped" not in r["s3"]:
        sides = [row["side"] for row in r["s3"]["stream"]]
        assert sides == ["local", "s3_in_line", "s3_read_ahead", "s3_cached"] and r["s3"]["dump"]["s3_over_local"] > 0
        assert r["s3"]["cache"]["hits"] > 0
    for title in ("store read", "dump-logits against a bare", "distilled training", "a sweep in one stacked pass",
                  "cached (one dump", "augmented views (jitter:2", "storage: bytes per sample",
                  "transformers.Trainer step"):
        assert title in p.stdout
