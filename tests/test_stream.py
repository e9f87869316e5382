"""The streaming reader: coverage, determinism, pairing by sample id, refusals, DataLoader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdcache.datasets import load_dataset
from kdcache.errors import StoreError
from kdcache.stream import DatasetStream, DistillStream
from tests.conftest import run_kdcache
from tests.helpers import SYNTH, SlowLinear


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store over a shuffled subset of the synthetic set, written in a non-sorted order."""
    d = tmp_path_factory.mktemp("stream")
    idx = np.random.default_rng(1).permutation(2000)[:1500]
    np.save(d / "idx.npy", idx)
    out = str(d / "s.zarr")
    run_kdcache("dump-logits", "--teacher", "tests.helpers:slow_teacher", "--dataset", SYNTH,
                "--subset", str(d / "idx.npy"), "--chunk-rows", "64", "--dtype", "float32", "--out", out)
    return out, idx


def collect(loader):
    xs, ys, zs, ids = [], [], [], []
    for x, y, z, i in loader:
        xs.append(x), ys.append(y), zs.append(z), ids.append(i)
    return torch.cat(xs), torch.cat(ys), torch.cat(zs), torch.cat(ids)


def test_every_row_once_and_logits_match_their_samples(store):
    path, idx = store
    data = load_dataset(SYNTH)
    s = DistillStream(path, data, batch_size=100, block_rows=64, window_bytes=64 * 300, return_ids=True)
    x, y, z, ids = collect(s)
    assert sorted(ids.tolist()) == sorted(idx.tolist())
    assert z.shape == (1500, 1, 5)
    teacher = SlowLinear()
    with torch.no_grad():
        np.testing.assert_allclose(z[:, 0].numpy(), teacher(x).numpy(), rtol=1e-5, atol=1e-5)
    x_ref, y_ref = data.dataset.get_batch(ids)
    torch.testing.assert_close(x, x_ref)
    torch.testing.assert_close(y, y_ref)


def test_order_is_shuffled_deterministic_and_changes_by_epoch(store):
    path, _ = store
    data = load_dataset(SYNTH)

    def order(seed, epoch):
        s = DistillStream(path, data, 100, seed=seed, block_rows=64, return_ids=True)
        s.set_epoch(epoch)
        return collect(s)[3].tolist()

    a = order(0, 0)
    assert a == order(0, 0)
    assert a != order(0, 1) and a != order(1, 0)
    assert sorted(a) == sorted(order(0, 1))
    store_order = DistillStream(path, data, 100, shuffle=False, return_ids=True)
    assert a != collect(store_order)[3].tolist()


def test_workers_share_an_epoch_without_drops_or_repeats(store):
    path, idx = store
    s = DistillStream(path, load_dataset(SYNTH), 50, block_rows=64, return_ids=True)
    ids = collect(DataLoader(s, batch_size=None, num_workers=2))[3]
    assert len(ids) == 1500 and sorted(ids.tolist()) == sorted(idx.tolist())


def test_memory_is_bounded_by_the_window(store):
    path, _ = store
    s = DistillStream(path, load_dataset(SYNTH), 32, block_rows=64, window_bytes=1)
    assert s.window_blocks == 1
    sizes = [len(y) for _, y, _ in s]
    assert max(sizes) == 32 and sum(sizes) == 1500


def test_refuses_other_dataset(store):
    path, _ = store
    with pytest.raises(StoreError, match=r"written from 2000 samples of .* but the dataset given .* has 3000"):
        DistillStream(path, load_dataset("synthetic:n=3000,dim=16,classes=5"))
    with pytest.raises(StoreError, match="has fingerprint .*different data, order or preprocessing"):
        DistillStream(path, load_dataset("synthetic:n=2000,dim=16,classes=5,seed=7"))


def test_dataset_stream_covers_indices(store):
    s = DatasetStream(load_dataset(SYNTH), 64, indices=np.arange(10, 500), return_ids=True)
    ids = torch.cat([i for _, _, z, i in DataLoader(s, batch_size=None, num_workers=2) if z is None])
    assert sorted(ids.tolist()) == list(range(10, 500))
