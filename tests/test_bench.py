"""`kdcache bench --quick` runs every benchmark; its output is checked for shape, never for speed."""
from __future__ import annotations

import json

import pytest

from kdcache.bench import BENCH_NAMES
from tests.conftest import run_kdcache


@pytest.mark.slow
def test_quick_bench_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    # every benchmark but vision, which test_quick_vision_bench_reports_every_figure runs
    only = [a for name in BENCH_NAMES if name != "vision" for a in ("--only", name)]
    p = run_kdcache("bench", "--quick", "--reps", "1", "--json", str(out), *only, timeout=900)
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


@pytest.mark.slow
def test_quick_vision_bench_reports_every_figure(tmp_path):
    """``bench --only vision --quick``: every figure of the section, and the FLOPs it states counted right."""
    from kdcache.bench import run_bench
    printed: list[str] = []
    r = run_bench(quick=True, only=["vision"], reps=1, echo=printed.append, json_path=str(tmp_path / "b.json"))
    v = json.loads((tmp_path / "b.json").read_text())["vision"]
    assert v == json.loads(json.dumps(r["vision"]))
    assert v["images"] == 40 and v["size"] == 32 and v["augment"] == "resized-crop:0.35+flip"
    assert v["student_flops_per_image"] == 2 * (3 * 32 * 32 * 64 + 64 * 10)  # mlp:64: two matmuls
    assert v["teacher_flops_per_image"] > 10 * v["student_flops_per_image"]
    assert v["decode"]["decode_resize_images_per_s"] > 0 and v["decode"]["decode_cut_resize_images_per_s"] > 0
    assert set(v["costs"]) == {"decode_resize_ms", "decode_cut_resize_ms", "teacher_forward_ms", "student_step_ms"}
    assert [row["dump"] for row in v["dump"]] == ["plain", "1 views (resized-crop:0.35+flip)"]
    assert all(row["ratio"] > 0 and row["goal"] == 1.05 and row["setup_s"] > 0 for row in v["dump"])
    assert [row["K"] for row in v["by_K"]] == [1, 4, 16] and v["by_K"][-1]["extrapolated"] is True
    assert [row["goal"] for row in v["by_K"]] == [None, 0.5, 0.2]
    assert all(row["cached_s"] > 0 and row["online_s"] > 0 and row["online_stacked_s"] > 0 for row in v["by_K"])
    assert v["store_ram"]["ratio"] > 0 and v["store_ram"]["K"] == 4
    text = "\n".join(printed)
    for title in ("decode + resize alone", "dump-logits against decode + bare teacher inference",
                  "cached (one dump of 1 views + K students", "training from the store against training from"):
        assert title in text
