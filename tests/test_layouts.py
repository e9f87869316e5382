"""Layout conformance: every registered layout goes through the same life (dump, both backends, verify,
inspect, verify --teacher, convert from dense, train), and a layout written here, in this one file,
joins all of it without a change anywhere else."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from kdcache.dump import DumpConfig, dump_logits
from kdcache.errors import SpecError, StoreError
from kdcache.layouts import LAYOUTS, Layout, layout_of, register
from kdcache.losses import distillation_loss, teacher_log_probs
from kdcache.store import open_store
from kdcache.summary import inspect_store
from kdcache.teacher_check import check_teacher
from kdcache.train import TrainConfig, train_students
from tests.helpers import SYNTH

TEACHER = "tests.helpers:slow_teacher"
DATA = SYNTH.replace("n=2000", "n=600")


@dataclass(frozen=True, kw_only=True)
class Int8(Layout):
    """Every logit, quantised to int8 with one float32 scale per row and member: ``z ~ q * scale``."""

    name = "int8"
    help = "int8: every logit, quantised"
    array_dims = {"q_logits": ("member", "class"), "q_scales": ("member",)}
    keeps_every_logit = True

    def row_arrays(self, members: int, dtype: str) -> dict[str, Any]:
        return {"q_logits": ((members, self.num_classes), "int8", 0), "q_scales": ((members,), "float32", 0)}

    def encode(self, chunk: int, z: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = z.abs().amax(-1).clamp(min=1e-12) / 127
        return {"q_logits": (z / scale[..., None]).round().clamp(-127, 127).to(torch.int8), "q_scales": scale}

    def targets(self, data: dict[str, np.ndarray], allow_interpolation: bool = False, where: str = "store") -> Any:
        return torch.from_numpy(data["q_logits"].astype(np.float32) * data["q_scales"][..., None])

    def predicted(self, data: dict[str, np.ndarray], ensemble: str = "mean-prob", members: Any = None) -> Any:
        return teacher_log_probs(self.targets(data), 1.0, ensemble, members).argmax(-1)

    def top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return self.targets(data).argmax(-1).numpy()

    def ensemble_top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        return self.predicted(data).numpy()

    def live_pairs(self, stored: dict[str, np.ndarray], live: np.ndarray) -> list[tuple[Any, ...]]:
        scale = stored["q_scales"].astype(np.float64)[..., None]
        deq = stored["q_logits"].astype(np.float64) * scale
        return [("q_logits", deq, live.astype(np.float64), np.broadcast_to(scale / 2, deq.shape))]


@pytest.fixture
def int8_layout():
    register(Int8)
    yield Int8
    del LAYOUTS["int8"]


OPTIONS = {"dense": {}, "topk": {"k": 2, "temperatures": [1.0, 4.0]},
           "sampled": {"samples": 12, "sampling_temperature": 4.0, "temperatures": [1.0, 4.0], "seed": 3},
           "int8": {}}


def _dump(tmp_path, layout: str, suffix: str, **kw: Any) -> str:
    out = str(tmp_path / f"{layout}{suffix}")
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=DATA, out=out, chunk_rows=100, dtype="float32",
                           layout=layout, progress=False, device="cpu", **{**OPTIONS[layout], **kw}))
    return out


def _arrays(path: str) -> dict[str, np.ndarray]:
    s = open_store(path)
    blk = s.read(0, s.manifest.num_samples)
    out = {**blk.data, "sample_ids": blk.sample_ids, "labels": blk.labels}
    s.close()
    return out


def _conforms(tmp_path, layout: str) -> None:
    zarr, h5 = _dump(tmp_path, layout, ".zarr"), _dump(tmp_path, layout, ".h5")
    a, b = _arrays(zarr), _arrays(h5)
    assert set(a) == set(b) == set(LAYOUTS[layout].array_dims) | {"sample_ids", "labels"}
    for name in a:  # both backends hold the same bytes
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name
    store = open_store(zarr)
    m = store.manifest
    assert m.layout == layout and isinstance(m.store_layout, LAYOUTS[layout])
    assert layout_of(m).params() == m.layout_params == {k: v for k, v in OPTIONS[layout].items()}
    assert store.verify() == []
    dims = m.dimension_names()
    assert all(dims[n] == ("sample", *LAYOUTS[layout].array_dims[n]) for n in LAYOUTS[layout].array_dims)
    store.close()
    info = inspect_store(zarr)
    assert info["layout"] == layout and info["rows_inspected"] == 600 and 0 <= info["accuracy"]["members"][0] <= 1
    check = check_teacher(zarr, [TEACHER], rows=200, device="cpu")
    assert check.problems == [] and check.top1_agreement[0] >= (0.9 if layout == "sampled" else 1.0)  # draws miss
    # a dense store converts to the layout with the same bytes as a dump of it
    from kdcache.convert import convert_store
    dense = _dump(tmp_path, "dense", "-src.zarr") if layout != "dense" else zarr
    conv = str(tmp_path / f"conv-{layout}.zarr")
    opts = OPTIONS[layout]
    convert_store(dense, conv, layout=layout, k=opts.get("k"), temperatures=opts.get("temperatures"),
                  samples=opts.get("samples"), sampling_temperature=opts.get("sampling_temperature"),
                  seed=opts.get("seed", 0), chunk_rows=100).close()
    c = _arrays(conv)
    assert all(c[n].tobytes() == a[n].tobytes() for n in a), "convert differs from dump"
    # students train from it at a temperature the layout serves
    res = train_students(TrainConfig(dataset=DATA, store=zarr, student="mlp:8", out=str(tmp_path / f"run-{layout}"),
                                     temperatures=[4.0], epochs=1, device="cpu", progress=False))
    assert len(res) == 1 and np.isfinite(res[0]["loss"]) and not res[0].get("diverged")


@pytest.mark.parametrize("layout", ["dense", "topk", "sampled"])
def test_built_in_layouts_conform(tmp_path, layout):
    _conforms(tmp_path, layout)


def test_a_layout_defined_in_one_file_joins_every_stage(tmp_path, int8_layout):
    _conforms(tmp_path, "int8")
    # the targets are the quantised logits: the loss is the dense one within the quantisation error
    z = torch.from_numpy(_arrays(_dump(tmp_path, "dense", "-ref.zarr"))["logits"])
    q = open_store(str(tmp_path / "int8.zarr"))
    blk = q.read(0, 600)
    t = q.manifest.store_layout.targets(blk.data)
    assert (t - z).abs().max() <= z.abs().amax(-1).max() / 127 / 2 + 1e-6
    s, y = torch.randn(600, 5, generator=torch.Generator().manual_seed(0)), torch.from_numpy(blk.labels)
    assert distillation_loss(s, t, y, 4.0, 0.9).item() == pytest.approx(distillation_loss(s, z, y, 4.0, 0.9).item(),
                                                                        rel=1e-2)
    # the CLI lists it and takes it
    from kdcache.cli import cli
    assert "int8: every logit, quantised" in " ".join(CliRunner().invoke(cli, ["dump-logits", "--help"]).output.split())
    r = CliRunner().invoke(cli, ["dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--layout", "int8",
                                 "--out", str(tmp_path / "cli.h5"), "--no-progress", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "cli.h5"), "--json"]).output)
    assert info["layout"] == "int8"


def test_layout_options_are_checked_by_the_layout(tmp_path):
    with pytest.raises(SpecError, match="layout topk needs k, the number of logits kept per row"):
        _dump(tmp_path, "topk", ".zarr", k=None)
    with pytest.raises(SpecError, match="k 9 but the teacher has 5 classes"):
        _dump(tmp_path, "topk", ".zarr", k=9)
    with pytest.raises(SpecError, match="samples applies to other layouts, not dense"):
        _dump(tmp_path, "dense", ".zarr", samples=4)
    from kdcache.cli import cli
    r = CliRunner().invoke(cli, ["dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--layout", "topk",
                                 "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 1 and "Error: layout topk needs --k, the number of logits kept per row" in r.output
    r = CliRunner().invoke(cli, ["dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--layout", "nope",
                                 "--out", str(tmp_path / "x.zarr")])
    assert r.exit_code == 2 and "'nope' is not one of 'dense', 'topk', 'sampled'" in r.output
    with pytest.raises(StoreError, match="layout 'nope' is not supported by this kdcache; known: dense, topk, sam"):
        layout_of(type("M", (), {"layout": "nope", "layout_params": {}, "num_classes": 5})())


def test_a_layout_module_named_in_kdcache_layouts_reaches_the_command(tmp_path):
    from tests.conftest import run_kdcache
    (tmp_path / "mylayouts.py").write_text("from kdcache.layouts import register\n"
                                           "from tests.test_layouts import Int8\n\nregister(Int8)\n")
    env = {"KDCACHE_LAYOUTS": "mylayouts", "PYTHONPATH": f"{tmp_path}:{Path(__file__).resolve().parent.parent}"}
    out = str(tmp_path / "q.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", DATA, "--layout", "int8", "--workers", "1",
                "--out", out, env=env)
    assert json.loads(run_kdcache("inspect", out, "--json", env=env).stdout)["layout"] == "int8"
    p = run_kdcache("inspect", out, check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"Error: {out}: layout 'int8' is not supported by this kdcache; known: dense, topk, sampled (a layout of "
        f"your own: name the module that registers it in KDCACHE_LAYOUTS)"]
    p = run_kdcache("inspect", out, env={"KDCACHE_LAYOUTS": "no_such_module"}, check=False)
    assert p.returncode == 1 and "KDCACHE_LAYOUTS names module 'no_such_module', which cannot be imported" in p.stderr
