"""Stores open in xarray: dimension names on every array (Zarr dimension_names, HDF5 dimension
scales), and kdcache.open_xarray with coordinates, the manifest and lazy arrays; values compared
with kdcache's own reader."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

import kdcache
from kdcache.dump import DumpConfig, dump_logits
from kdcache.store import open_store
from tests.helpers import write_corpus

DATA = "synthetic:n=300,dim=16,classes=5"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("xr")
    corpus = write_corpus(d / "corpus.txt", paragraphs=40)
    out = {}
    for suffix in (".zarr", ".h5"):
        for layout, kw, teachers, data in (
                ("dense", {}, ["tests.helpers:slow_teacher", "tests.helpers:other_teacher"], DATA),
                ("topk", {"layout": "topk", "k": 2, "temperatures": [1.0, 4.0]}, ["tests.helpers:slow_teacher"], DATA),
                ("per-token", {}, ["tests.helpers:token_teacher"], corpus)):
            path = str(d / f"{layout}{suffix}")
            dump_logits(DumpConfig(teachers=teachers, dataset=data, out=path, chunk_rows=64, progress=False,
                                   subset="50:300" if layout == "dense" else None, **kw))
            out[layout, suffix] = path
    return out


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
@pytest.mark.parametrize("layout", ["dense", "topk", "per-token"])
def test_open_xarray_matches_kdcache_reader(stores, layout, suffix):
    path = stores[layout, suffix]
    ds = kdcache.open_xarray(path)
    s = open_store(path)
    block = s.read(0, s.num_samples)
    m = s.manifest
    assert ds.attrs["num_samples"] == m.num_samples and ds.attrs["members"] == m.members
    row = "position" if layout == "per-token" else "sample"
    for name, values in block.data.items():
        assert ds[name].dims[0] == row
        np.testing.assert_array_equal(ds[name].values, values)
    np.testing.assert_array_equal(ds["labels"].values, block.labels)
    np.testing.assert_array_equal(ds["chunk_sha256"].values, s.digests())
    assert ds["chunk_sha256"].dims == ("chunk", "digest_byte")
    if layout == "per-token":
        ids, offsets = s.sequence_index()
        np.testing.assert_array_equal(ds["sequence_ids"].values, ids)
        np.testing.assert_array_equal(ds["sequence_offsets"].values, offsets)
        np.testing.assert_array_equal(ds["sequence_id"].values, block.sample_ids)
    else:  # rows labelled by their dataset index: select a sample by what it is, not where it was stored
        np.testing.assert_array_equal(ds["sample"].values, block.sample_ids)
        i = int(np.argmax(block.sample_ids == 123))
        first = "logits" if layout == "dense" else "topk_values"
        np.testing.assert_array_equal(ds[first].sel(sample=123).values, block.data[first][i])
    if layout == "dense":
        assert ds.logits.sel(member=0).shape == (250, 5)
        assert list(ds.member_name.values) == [mm["name"] for mm in m.members]
    if layout == "topk":
        assert list(ds.temperature.values) == [1.0, 4.0] and ds.log_normalizers.dims[-1] == "temperature"
    s.close()


def test_arrays_are_lazy_until_used(stores):
    ds = kdcache.open_xarray(stores["dense", ".zarr"])
    assert not isinstance(ds.logits.variable._data, np.ndarray)  # a lazy backend (or dask) array
    assert ds.logits.isel(sample=slice(0, 3)).values.shape == (3, 2, 5)


def test_plain_xarray_and_zarr_see_the_dimension_names(stores):
    g = zarr.open_group(stores["dense", ".zarr"], mode="r")
    assert g["logits"].metadata.dimension_names == ("sample", "member", "class")
    ds = xr.open_zarr(stores["topk", ".zarr"], consolidated=False)
    assert ds.topk_ids.dims == ("sample", "member", "k")
    ds = xr.open_dataset(stores["per-token", ".h5"], engine="h5netcdf")
    assert ds.logits.dims == ("position", "member", "class") and ds.sequence_ids.dims == ("sequence",)


def test_an_incomplete_store_is_refused_by_open_xarray(tmp_path):
    from kdcache.store import Manifest, create_store
    m = Manifest(num_samples=10, num_classes=3, num_members=1, dtype="float16", chunk_rows=5,
                 members=[{"name": "t", "spec": "t", "sha256": "0" * 64}],
                 dataset={"spec": "x", "name": "x", "split": None, "length": 10, "fingerprint": "0", "subset": None})
    create_store(str(tmp_path / "p.zarr"), m).close()
    with pytest.raises(kdcache.StoreError, match="store is incomplete"):
        kdcache.open_xarray(str(tmp_path / "p.zarr"))


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_a_store_with_views_has_a_row_dimension_with_sample_and_view(tmp_path, suffix):
    path = str(tmp_path / f"views{suffix}")
    dump_logits(DumpConfig(teachers=["tests.helpers:image_teacher"], dataset="mnist:test", subset="0:100", out=path,
                           augment="crop:2+flip", views=3, chunk_rows=64, progress=False))
    ds = kdcache.open_xarray(path)
    assert ds.logits.dims == ("row", "member", "class") and ds.view_params.dims == ("row", "view_param")
    assert list(ds.view_param.values) == ["crop.top", "crop.left", "flip.flip"]
    np.testing.assert_array_equal(ds.view.values, np.repeat([0, 1, 2], 100))
    np.testing.assert_array_equal(ds.sample_id.values, np.tile(np.arange(100), 3))
    block = open_store(path).read(0, 300)
    np.testing.assert_array_equal(ds.view_params.values, block.data["view_params"])
    np.testing.assert_array_equal(ds.logits.where(ds.view == 2, drop=True).values, block.logits[200:])
