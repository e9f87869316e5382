"""A store as an ``xarray.Dataset``: labelled, lazily loaded, the manifest in ``attrs``.

xarray (and h5netcdf for HDF5 stores) is an optional extra: ``pip install 'kdcache[xarray]'``.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from kdcache.errors import KdcacheError, StoreError
from kdcache.store import open_store


def open_xarray(store: str | os.PathLike) -> Any:
    """Open a store with xarray: every array a variable with its dimension names, ``sample`` (rows of
    a per-sample store) labelled by the dataset index of each row (``sample_ids``), ``member`` by
    member number (names in ``member_name``), ``class`` by class name where the manifest has them,
    ``temperature`` by the grid of a sparse store; the manifest in ``attrs``. Nothing is read until
    it is used (dask arrays where dask is installed, xarray's lazy arrays otherwise)::

        ds = kdcache.open_xarray("teacher.zarr")
        ds.logits.sel(member=0)
    """
    try:
        import xarray as xr
    except ImportError:
        raise KdcacheError("open_xarray needs xarray (and h5netcdf for HDF5 stores): "
                           "pip install 'kdcache[xarray]'") from None
    s = open_store(store)  # refuses what kdcache refuses: incomplete, damaged manifest, other version
    m, path, fmt = s.manifest, s.path, s.format
    s.close()
    try:
        import dask  # noqa: F401
        chunks: Any = {}
    except ImportError:
        chunks = None
    try:
        if fmt == "zarr":
            ds = xr.open_zarr(path, consolidated=False, chunks=chunks, mask_and_scale=False)
        else:
            try:
                import h5netcdf  # noqa: F401
            except ImportError:
                raise KdcacheError("opening an HDF5 store with xarray needs h5netcdf: "
                                   "pip install 'kdcache[xarray]'") from None
            ds = xr.open_dataset(path, engine="h5netcdf", chunks=chunks, mask_and_scale=False)
    except KdcacheError:
        raise
    except Exception as e:
        raise StoreError(f"{path}: xarray cannot open it ({type(e).__name__}: {str(e).splitlines()[0]}); stores "
                         f"written before kdcache named their dimensions need `kdcache convert` to a new store "
                         f"first") from None
    row = "position" if m.per_token else "sample"
    coords: dict[str, Any] = {"member": np.arange(m.num_members),
                              "member_name": ("member", [mm["name"] for mm in m.members])}
    if m.views is not None:
        coords["sample_id"] = ("row", ds["sample_ids"].data)
        coords["view"] = ("row", np.arange(m.num_samples) // m.samples_per_view)
        coords["view_param"] = list(m.views["columns"])
    elif not m.per_token:
        coords["sample"] = ds["sample_ids"]  # a lazy index: read when first used
    else:
        coords["sequence_id"] = (row, ds["sample_ids"].data)
    if m.class_names and "class" in ds.dims:
        coords["class"] = list(m.class_names)
    if "temperature" in ds.dims:
        coords["temperature"] = list(m.layout_params["temperatures"])
    ds = ds.assign_coords(coords)
    ds.attrs = m.to_dict()
    return ds
