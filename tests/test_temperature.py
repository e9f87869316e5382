"""One temperature: every place that shows tempered probabilities agrees with ``teacher_log_probs``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.bench import topk_fidelity
from kdcache.dump import DumpConfig, dump_logits
from kdcache.layouts.dense import ENTROPY_TEMPERATURES
from kdcache.losses import distillation_loss, soft_targets, teacher_log_probs
from kdcache.store import open_store
from kdcache.summary import inspect_store
from tests.helpers import SYNTH

DATA = SYNTH.replace("n=2000", "n=500")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("temperature")
    common = dict(dataset=DATA, dtype="float32", chunk_rows=100, progress=False, device="cpu")
    dense, topk = str(d / "dense.zarr"), str(d / "top2.zarr")
    dump_logits(DumpConfig(teachers=["tests.helpers:slow_teacher", "tests.helpers:other_teacher"], out=dense,
                           **common))
    dump_logits(DumpConfig(teachers=["tests.helpers:slow_teacher"], out=topk, layout="topk", k=2,
                           temperatures=[1.0, 4.0], **common))
    s = open_store(dense)
    z = torch.from_numpy(s.read(0, 500).logits.astype(np.float32))
    s.close()
    return dense, topk, z


def test_inspect_entropy_is_that_of_teacher_log_probs(stores):
    dense, _, z = stores
    info = inspect_store(dense)
    for t in ENTROPY_TEMPERATURES:
        logp = teacher_log_probs(z, t).double()
        assert info["mean_entropy"][f"T={t:g}"] == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), rel=1e-9)


def test_inspect_tail_mass_and_sparse_targets_are_teacher_log_probs_at_the_kept_ids(stores):
    _, topk, z = stores
    one = z[:, :1]
    info = inspect_store(topk)
    s = open_store(topk)
    m = s.manifest
    targets = m.store_layout.targets(s.read(0, 500).data)
    for t in (1.0, 4.0):
        logp = teacher_log_probs(one, t)
        kept = logp.gather(1, targets.ids[:, 0])
        torch.testing.assert_close(targets.log_probs(t)[:, 0], kept, rtol=0, atol=2e-6)
        tail = (1 - kept.double().exp().sum(-1)).clamp(0, 1)
        assert info["mean_tail_mass"][f"T={t:g}"] == pytest.approx(float(tail.mean()), abs=1e-6)
    s.close()


def test_soft_targets_bench_fidelity_and_the_loss_use_the_same_tempered_probabilities(stores):
    _, _, z = stores
    one = z[:, :1]
    for t in (1.0, 2.0, 4.0):
        torch.testing.assert_close(soft_targets(one, t), teacher_log_probs(one, t).exp())
        row = topk_fidelity(one[:, 0].numpy(), [2], [t])[0]
        p = teacher_log_probs(one.double(), t).exp()
        assert row["tail_mass"] == pytest.approx(float((1 - p.topk(2, -1).values.sum(-1)).clamp(0, 1).mean()),
                                                 abs=1e-9)
        # the soft term at T with alpha 1: T^2 KL(p_T || q_T), p_T from teacher_log_probs
        s = torch.randn(500, 5, generator=torch.Generator().manual_seed(1))
        logp = teacher_log_probs(z, t)
        logq = torch.log_softmax(s / t, -1)
        want = t * t * (logp.exp() * (logp - logq)).sum() / 500
        assert distillation_loss(s, z, torch.full((500,), -1), t, 1.0).item() == pytest.approx(want.item(), rel=1e-5)
