"""Sparse layouts: exact temperature from top-k plus log-normalisers, sampled ids, stores, refusals."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
import zarr

from kdcache.errors import KdcacheError
from kdcache.losses import distillation_loss
from kdcache.sparse import SparseTargets, sampled_rows, sparse_kl, topk_rows
from kdcache.store import open_store
from tests.conftest import run_kdcache
from tests.helpers import SYNTH

GRID = (1.0, 2.0, 4.0, 8.0, 20.0)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def topk_targets(z, k, grid=GRID, allow=False):
    d = topk_rows(z, k, grid)
    return SparseTargets("topk", torch.from_numpy(d["topk_ids"]).long(), torch.from_numpy(d["topk_values"]),
                         torch.from_numpy(d["log_normalizers"]), grid, allow_interpolation=allow)


def sampled_targets(z, n, ts, grid=GRID, seed=0):
    grid = tuple(sorted(set(grid) | {ts}))
    d = sampled_rows(z, n, ts, grid, torch.Generator().manual_seed(seed))
    return SparseTargets("sampled", torch.from_numpy(d["sampled_ids"]).long(), torch.from_numpy(d["sampled_values"]),
                         torch.from_numpy(d["log_normalizers"]), grid,
                         torch.from_numpy(d["sampled_counts"].astype(np.int64)), ts)


@pytest.mark.parametrize("T", GRID)
def test_topk_bucket_kl_is_exact_at_grid_temperatures(T):
    g = np.random.default_rng(0)
    z = g.normal(0, 3, (64, 1, 50)).astype(np.float32)
    s = g.normal(0, 2, (64, 50)).astype(np.float32)
    k = 7
    got = sparse_kl(torch.from_numpy(s), topk_targets(torch.from_numpy(z), k), T).item()
    # independent: full softmax, then merge every class outside the teacher's top-k into one bucket
    p, q = np_softmax(z[:, 0].astype(np.float64) / T), np_softmax(s.astype(np.float64) / T)
    top = np.argsort(-z[:, 0], axis=1)[:, :k]
    pk, qk = np.take_along_axis(p, top, 1), np.take_along_axis(q, top, 1)
    pb = np.concatenate([pk, 1 - pk.sum(1, keepdims=True)], 1)
    qb = np.concatenate([qk, 1 - qk.sum(1, keepdims=True)], 1)
    assert got == pytest.approx((pb * np.log(pb / qb)).sum(1).mean(), rel=1e-4)


@pytest.mark.parametrize("T", GRID)
def test_topk_with_k_equal_to_the_classes_is_the_dense_kl(T):
    """Every class kept: the tail is empty (not a bucket of rounding error against a student tail of -inf)."""
    g = torch.Generator().manual_seed(1)
    z, s = torch.randn(64, 1, 10, generator=g) * 5, torch.randn(64, 10, generator=g) * 3
    got = sparse_kl(s, topk_targets(z, 10), T)
    want = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(z[:, 0] / T, -1),
                                      log_target=True, reduction="batchmean")
    assert torch.isfinite(got) and got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7)
    labels = torch.randint(0, 10, (64,), generator=g)
    dense = distillation_loss(s, z, labels, T, 0.9)
    assert distillation_loss(s, topk_targets(z, 10), labels, T, 0.9).item() == pytest.approx(dense.item(), rel=1e-5)


def test_kept_probabilities_are_the_full_softmax_at_every_grid_temperature():
    z = torch.randn(32, 2, 300) * 4
    t = topk_targets(z, 20)
    for T in GRID:
        full = torch.softmax(z / T, -1).gather(-1, t.ids)
        np.testing.assert_allclose((t.values / T - t.log_normalizer(T)[..., None]).exp(), full, rtol=1e-4, atol=1e-7)


def test_off_grid_temperature_is_refused_unless_interpolation_is_allowed():
    z = torch.randn(16, 1, 40) * 3
    with pytest.raises(KdcacheError, match=r"temperature 3 is not in the store's grid .*allow interpolation"):
        sparse_kl(torch.zeros(16, 40), topk_targets(z, 5), 3.0)
    with pytest.raises(KdcacheError, match="outside the store's grid 1..20"):
        sparse_kl(torch.zeros(16, 40), topk_targets(z, 5, allow=True), 30.0)
    t = topk_targets(z, 5, allow=True)
    exact = torch.logsumexp(z / 3.0, -1)
    approx = t.log_normalizer(3.0)
    assert (approx - exact).abs().max() < 0.25 and (approx >= exact - 1e-5).all()  # linear in 1/T: convex, so above


@pytest.mark.parametrize("T,ts", [(1.0, 1.0), (4.0, 4.0), (4.0, 2.0)])
def test_sampled_estimate_converges_to_the_full_kl(T, ts):
    torch.manual_seed(0)
    z = torch.randn(400, 1, 30) * 3
    s = torch.randn(400, 30)
    exact = (distillation_loss(s, z, torch.full((400,), -1), T, 1.0) / T ** 2).item()
    est = np.mean([sparse_kl(s, sampled_targets(z, 2000, ts, seed=i), T).item() for i in range(3)])
    assert est == pytest.approx(exact, rel=0.03, abs=0.003)


def test_sparse_ensemble_reduction_is_refused_but_one_member_is_served():
    z = torch.randn(8, 3, 20)
    t = topk_targets(z, 4)
    with pytest.raises(KdcacheError, match=r"3 members.* own sparse logits.*one member with members i"):
        distillation_loss(torch.zeros(8, 20), t, torch.zeros(8, dtype=torch.long), 2.0, 1.0)
    one = distillation_loss(torch.zeros(8, 20), t, torch.zeros(8, dtype=torch.long), 2.0, 1.0, members=[1])
    ref = distillation_loss(torch.zeros(8, 20), topk_targets(z[:, 1:2], 4), torch.zeros(8, dtype=torch.long), 2.0, 1.0)
    assert one.item() == pytest.approx(ref.item())


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("sparse")
    run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--chunk-rows", "250",
                "--dtype", "float32", "--out", str(d / "dense.zarr"))
    return d


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_dump_topk_equals_convert_from_dense_and_trains(dense, suffix):
    out = str(dense / f"top2{suffix}")
    run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--chunk-rows", "250",
                "--dtype", "float32", "--layout", "topk", "--k", "2", "--temperatures", "1,4", "--out", out)
    conv = str(dense / f"conv{suffix}")
    run_kdcache("convert", str(dense / "dense.zarr"), conv, "--layout", "topk", "--k", "2", "--temperatures", "1,4",
                "--chunk-rows", "250")
    a, b, full = open_store(out), open_store(conv), open_store(str(dense / "dense.zarr"))
    assert a.manifest.layout == "topk" and a.manifest.layout_params == {"k": 2, "temperatures": [1.0, 4.0]}
    for name in ("topk_values", "topk_ids", "log_normalizers", ):
        np.testing.assert_allclose(a.read(0, 2000).data[name], b.read(0, 2000).data[name], rtol=1e-6)
    z = full.read(0, 2000).logits
    np.testing.assert_array_equal(a.read(0, 2000).data["topk_ids"], np.argsort(-z, -1, kind="stable")[..., :2])
    assert run_kdcache("verify", out).returncode == 0
    info = json.loads(run_kdcache("inspect", out, "--json").stdout)
    assert info["layout"] == "topk" and set(info["mean_tail_mass"]) == {"T=1", "T=4"}
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", out, "--student", "mlp:16", "--temperature",
                    "4", "--epochs", "1", "--out", str(dense / f"st{suffix}"))
    assert "| T4-a0.9-s0 | 4 |" in p.stdout
    # k = the number of classes: the student trains exactly as from the dense store
    full_k = str(dense / f"top5{suffix}")
    run_kdcache("convert", str(dense / "dense.zarr"), full_k, "--layout", "topk", "--k", "5", "--temperatures", "1,4",
                "--chunk-rows", "250")
    runs = {}
    for name, src in (("topk5", full_k), ("dense", str(dense / "dense.zarr"))):
        p = run_kdcache("train-student", "--dataset", SYNTH, "--store", src, "--student", "mlp:16", "--temperature",
                        "4", "--epochs", "2", "--out", str(dense / f"{name}{suffix}"))
        assert "diverged" not in p.stderr
        runs[name] = json.loads((dense / f"{name}{suffix}" / "metrics.json").read_text())
    assert [m["loss"] for m in runs["topk5"]] == pytest.approx([m["loss"] for m in runs["dense"]], rel=1e-4)
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", out, "--student", "mlp:16", "--temperature",
                    "2", "--epochs", "1", "--out", str(dense / f"st2{suffix}"), check=False)
    assert p.returncode == 1 and "temperature 2 is not in the store's grid [1.0, 4.0]" in p.stderr


def test_sampled_dump_is_deterministic_and_resumes_identically(dense):
    args = ["dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--chunk-rows", "250",
            "--layout", "sampled", "--samples", "16", "--sampling-temperature", "2"]
    ref = str(dense / "s-ref.zarr")
    run_kdcache(*args, "--out", ref)
    out = str(dense / "s.zarr")
    run_kdcache(*args, "--out", out)
    g = zarr.open_group(out, mode="r+")  # what a crash after chunk 2 leaves: later digests unwritten
    g["chunk_sha256"][3:] = 0
    g.attrs["kdcache"] = {**g.attrs["kdcache"], "complete": False}
    g["sampled_counts"][900:] = 0  # and garbage where the rows were being written
    p = run_kdcache(*args, "--out", out)
    assert "3 chunks kept from an earlier run" in p.stdout
    a, b = open_store(ref).read(0, 2000), open_store(out).read(0, 2000)
    for name in a.data:
        np.testing.assert_array_equal(a.data[name], b.data[name])
    s = open_store(out)
    assert s.manifest.layout_params["temperatures"] == [1.0, 2.0, 4.0, 8.0, 20.0]
    counts = a.data["sampled_counts"].astype(int)
    assert (counts.sum(-1) == 16).all() and ((a.data["sampled_ids"] >= 0) == (counts > 0)).all()


def test_refusals(dense, tmp_path):
    p = run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH, "--layout", "topk",
                    "--k", "6", "--out", str(tmp_path / "k.zarr"), check=False)
    assert p.returncode == 1 and "--k 6 but the teacher has 5 classes" in p.stderr
    out = tmp_path / "bad.h5"
    run_kdcache("convert", str(dense / "dense.zarr"), str(out), "--layout", "topk", "--k", "3", "--chunk-rows", "250")
    with h5py.File(out, "r+") as f:
        f["topk_ids"][1200, 0, 1] = 77  # a corrupt id
    p = run_kdcache("verify", str(out), check=False)
    assert p.returncode == 1 and "chunks 4 hold class ids outside 0..4" in p.stderr
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", str(out), "--student", "mlp:4", "--temperature",
                    "4", "--epochs", "1", "--out", str(tmp_path / "st"), check=False)
    # the chunk's sha256 refuses it on read, before its ids are used
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "chunk 4 (rows 1000:1250) does not match" in p.stderr
    p = run_kdcache("convert", str(out), str(tmp_path / "x.zarr"), "--layout", "sampled", "--samples", "3",
                    check=False)
    assert p.returncode == 1 and "only a dense store can be converted to another layout" in p.stderr
