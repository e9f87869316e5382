"""inspect, verify and convert through the real CLI, on stores dumped from real teachers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from kdcache.store import open_store
from tests.conftest import run_kdcache
from tests.helpers import SYNTH, SlowLinear

ENSEMBLE = ["--teacher", "tests.helpers:slow_teacher", "--teacher", "tests.helpers:other_teacher"]


@pytest.fixture(scope="module")
def ens(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    out = str(d / "ens.zarr")
    run_kdcache("dump-logits", *ENSEMBLE, "--dataset", SYNTH, "--chunk-rows", "256", "--out", out)
    return out


def test_inspect_json_reports_manifest_and_statistics_from_the_data(ens):
    info = json.loads(run_kdcache("inspect", ens, "--json").stdout)
    for key in ("format_version", "layout", "num_samples", "num_classes", "num_members", "dtype", "complete",
                "members", "dataset"):
        assert key in info
    assert (info["num_samples"], info["num_members"], info["num_classes"]) == (2000, 2, 5)
    assert info["complete"] is True and info["bytes_on_disk"] > 2000 * 2 * 5 * 2
    # independent: the same accuracy and agreement from the teachers themselves
    from kdcache.datasets import load_dataset
    x, y = load_dataset(SYNTH).dataset.get_batch(np.arange(2000))
    import torch
    with torch.no_grad():
        a, b = SlowLinear()(x).half().float(), SlowLinear(seed=1)(x).half().float()
    assert info["accuracy"]["members"][0] == pytest.approx((a.argmax(1) == y).double().mean().item(), abs=1e-9)
    assert info["accuracy"]["members"][1] == pytest.approx((b.argmax(1) == y).double().mean().item(), abs=1e-9)
    agree = (a.argmax(1) == b.argmax(1)).double().mean().item()
    assert info["member_agreement"]["all"] == pytest.approx(agree, abs=1e-9)
    ent = info["mean_entropy"]
    assert ent["T=1"] < ent["T=4"] < ent["T=20"] <= np.log(5) + 1e-6
    text = run_kdcache("inspect", ens).stdout
    assert "2000 samples x 2 members x 5 classes" in text and "all members agree on" in text


def test_verify_passes_then_names_a_corrupt_chunk(ens, tmp_path):
    assert "ok (2000 rows, 8 chunks verified)" in run_kdcache("verify", ens).stdout
    bad = tmp_path / "bad.zarr"
    run_kdcache("convert", ens, str(bad))
    zarr.open_group(str(bad), mode="r+")["logits"][700, 1, 3] = 9.0
    p = run_kdcache("verify", str(bad), check=False)
    assert p.returncode == 1 and p.stderr.strip() == f"Error: {bad}: chunks 2 do not match their stored sha256"


def test_verify_reports_an_incomplete_store(tmp_path):
    from kdcache.store import create_store
    from tests.store.test_conformance import make_manifest
    s = create_store(str(tmp_path / "half.h5"), make_manifest())
    s.close()
    p = run_kdcache("verify", str(tmp_path / "half.h5"), check=False)
    assert p.returncode == 1 and "store is not marked complete; chunks 0-7 are not written" in p.stderr


@pytest.mark.parametrize("dst,dtype", [("c.h5", "float32"), ("c.zarr", "float16")])
def test_convert_between_backends_and_dtypes(ens, tmp_path, dst, dtype):
    out = str(tmp_path / dst)
    run_kdcache("convert", ens, out, "--dtype", dtype, "--chunk-rows", "300")
    a, b = open_store(ens), open_store(out)
    assert b.manifest.dtype == dtype and b.manifest.chunk_rows == 300
    assert b.manifest.members == a.manifest.members and b.manifest.dataset == a.manifest.dataset
    np.testing.assert_array_equal(b.read(0, 2000).logits.astype(np.float32), a.read(0, 2000).logits.astype(np.float32))
    assert run_kdcache("verify", out).returncode == 0


def test_user_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        (["inspect", str(tmp_path / "nope.zarr")], "does not exist"),
        (["dump-logits", "--teacher", "mlp:x", "--dataset", SYNTH, "--out", str(tmp_path / "a.zarr")],
         "hidden sizes must be integers"),
        (["dump-logits", "--teacher", "nopkg.mod:fn", "--dataset", SYNTH, "--out", str(tmp_path / "a.zarr")],
         "cannot import module 'nopkg.mod'"),
        (["dump-logits", "--teacher", "mlp:4", "--dataset", "imagenet:train", "--out", str(tmp_path / "a.zarr")],
         "unknown dataset spec 'imagenet:train'"),
        (["dump-logits", "--teacher", "mlp:4", "--dataset", SYNTH, "--out", str(tmp_path / "a.bin")],
         "cannot tell the format"),
        (["dump-logits", "--teacher", "mlp:4", "--dataset", SYNTH, "--subset", "exclude-classes:x",
          "--out", str(tmp_path / "a.zarr")], "classes must be integers"),
        (["dump-logits", "--teacher", str(tmp_path / "missing.safetensors"), "--dataset", SYNTH,
          "--out", str(tmp_path / "a.zarr")], "does not exist"),
    ]
    for args, message in cases:
        p = run_kdcache(*args, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], \
            (args, p.stderr)


def test_remote_store_without_its_filesystem_package_is_one_line():
    pytest.importorskip("fsspec")
    try:
        import s3fs  # noqa: F401
        pytest.skip("s3fs is installed: the URL would be tried for real")
    except ImportError:
        pass
    p = run_kdcache("inspect", "s3://bucket/teacher.zarr", check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "Error: cannot open 's3://bucket/teacher.zarr': Install s3fs to access S3 (e.g. pip install s3fs for s3://, "
        "gcsfs for gs://)"]


def test_subsets_combine_with_plus_in_the_first_ones_order():
    from kdcache.datasets import load_dataset
    from kdcache.errors import SpecError
    from kdcache.subset import dataset_labels, resolve_subset
    data = load_dataset(SYNTH).dataset
    labels = dataset_labels(data)
    idx, desc = resolve_subset("100:600+exclude-classes:3", data)
    assert desc == "range:100:600+exclude-classes:3"
    assert idx.tolist() == [i for i in range(100, 600) if labels[i] != 3]
    with pytest.raises(SpecError, match="selects no rows"):
        resolve_subset("0:10+10:20", data)
