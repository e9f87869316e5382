"""Stacked students: the same results as students trained one by one, per-student settings honoured,
the fallbacks for what cannot stack, and the stacked loss against the one-student loss."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdcache.dump import DumpConfig, dump_logits
from kdcache.losses import distillation_loss, distillation_losses
from kdcache.sparse import targets_from_arrays, topk_rows
from kdcache.specs import load_model
from kdcache.train import TrainConfig, train_students
from kdcache.train.stacked import StackedOptimizer, cpu_stack_group
from tests.conftest import run_kdcache
from tests.helpers import SYNTH, small_convnet


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("stacked")
    path = str(d / "t.zarr")
    dump_logits(DumpConfig(teachers=["tests.helpers:slow_teacher"], dataset=SYNTH, out=path, chunk_rows=256,
                           progress=False))
    return path


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_model(str(run_dir)).module.state_dict()


def _sweep(tmp_path, store, name, **kw):
    base = dict(dataset=SYNTH, student="mlp:32,16", out=str(tmp_path / name), store=store, temperatures=[1.0, 4.0],
                alphas=[0.5], seeds=[0, 1], lrs=[0.05, 0.2], epochs=2, batch_size=64, weight_decay=1e-3,
                progress=False, device="cpu")
    base.update(kw)
    return train_students(TrainConfig(**base))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_stacked_sweep_ends_where_separate_runs_end(tmp_path, store, optimizer, capfd):
    lr = [0.05, 0.2] if optimizer == "sgd" else [0.003, 0.01]
    stacked = _sweep(tmp_path, store, "stacked", optimizer=optimizer, lrs=lr)
    assert "8 students of mlp:32,16 train as one stacked model (batched matrix products)" in capfd.readouterr().err
    alone = _sweep(tmp_path, store, "alone", optimizer=optimizer, lrs=lr, stack=False)
    assert [r["run"] for r in stacked] == [r["run"] for r in alone] and len(stacked) == 8
    for a, b in zip(stacked, alone):
        wa, wb = _weights(a["dir"]), _weights(b["dir"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # per-student settings: learning rates (cosine from each base), temperatures and alphas recorded
    by = {r["run"]: r for r in stacked}
    hist = json.loads((tmp_path / "stacked" / f"T4-a0.5-s1-lr{lr[1]:g}" / "metrics.json").read_text())
    assert hist[0]["lr"] == pytest.approx(lr[1]) and hist[1]["lr"] == pytest.approx(lr[1] / 2)
    config = json.loads((tmp_path / "stacked" / f"T1-a0.5-s0-lr{lr[0]:g}" / "config.json").read_text())
    assert config["lr"] == lr[0] and config["temperature"] == 1.0 and "lrs" not in config
    # the learning rate and the temperature both change the result
    w = {n: _weights(by[n]["dir"])["net.2.weight"] for n in by}
    assert not torch.equal(w[f"T1-a0.5-s0-lr{lr[0]:g}"], w[f"T1-a0.5-s0-lr{lr[1]:g}"])
    assert not torch.equal(w[f"T1-a0.5-s0-lr{lr[0]:g}"], w[f"T4-a0.5-s0-lr{lr[0]:g}"])


def test_vmap_students_and_stack_groups_match_separate_runs(tmp_path, store, capfd):
    kw = dict(student="tests.helpers:small_convnet", lrs=[0.05], temperatures=[2.0, 8.0], seeds=[0, 1, 2])
    grouped = _sweep(tmp_path, store, "grouped", stack_group=4, **kw)
    err = capfd.readouterr().err
    assert "training the 6 students in 2 stacks of at most 4 (--stack-group 4)" in err
    assert "3 students of tests.helpers:small_convnet train as one stacked model (torch.func vmap)" in err
    alone = _sweep(tmp_path, store, "alone", stack=False, **kw)
    assert "training 6 students one by one (--no-stack)" in capfd.readouterr().err
    for a, b in zip(grouped, alone):
        wa, wb = _weights(a["dir"]), _weights(b["dir"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [dict(dropout=0.3), dict(input_dropout=0.2), dict(dropout=0.3, input_dropout=0.2)])
def test_stacked_students_with_dropout_are_each_the_student_alone(tmp_path, store, dropout, capfd):
    """Each student's dropout masks come from its own generator: a stack of 1, 2 or 3, in groups or
    alone, gives every student the weights it gets alone (the stack's composition changes nothing)."""
    kw = dict(student="mlp:64,64", lrs=[0.1], alphas=[0.9], seeds=[0], **dropout)
    alone = {r["run"]: _weights(r["dir"]) for r in _sweep(tmp_path, store, "alone", temperatures=[2.0, 5.0, 20.0],
                                                              stack=False, sweep_dirs=True, **kw)}
    for name, temps, extra in (("one", [2.0], {}), ("two", [2.0, 5.0], {}), ("three", [2.0, 5.0, 20.0], {}),
                               ("groups", [2.0, 5.0, 20.0], {"stack_group": 2})):
        got = _sweep(tmp_path, store, name, temperatures=temps, sweep_dirs=True, **kw, **extra)
        if len(temps) > 1:
            assert "train as one stacked model (batched matrix products)" in capfd.readouterr().err
        for r in got:
            w = _weights(r["dir"])
            for k in w:
                torch.testing.assert_close(w[k], alone[r["run"]][k], rtol=1e-5, atol=2e-6)
    # the dropout is real: another seed gives other weights
    other = _sweep(tmp_path, store, "seed1", temperatures=[2.0], sweep_dirs=True, **{**kw, "seeds": [1]})
    assert not torch.equal(_weights(other[0]["dir"])["net.2.weight"], alone["T2-a0.9-s0"]["net.2.weight"])


def test_a_vmap_stack_draws_each_students_dropout_from_its_own_generator(tmp_path, store, capfd):
    """nn.Dropout inside a module stacked through vmap: each student's masks come from its own generator,
    so each student of the stack is the student alone."""
    kw = dict(student="tests.helpers:dropout_convnet", lrs=[0.05], temperatures=[2.0, 8.0], seeds=[0])
    swept = _sweep(tmp_path, store, "sweep", **kw)
    err = capfd.readouterr().err
    assert ("2 students of tests.helpers:dropout_convnet train as one stacked model (torch.func vmap, each "
            "student's dropout masks drawn from its own generator)") in err
    for r in swept:
        alone = _sweep(tmp_path, store, f"alone-{r['run']}", **{**kw, "temperatures": [r["temperature"]]})
        wa, wb = _weights(r["dir"]), _weights(alone[0]["dir"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-6)
    nodrop = _sweep(tmp_path, store, "nodrop", **{**kw, "student": "tests.helpers:small_convnet",
                                                   "temperatures": [2.0]})
    assert not torch.allclose(_weights(nodrop[0]["dir"])["1.weight"], _weights(swept[0]["dir"])["1.weight"])


def test_a_module_that_draws_other_random_numbers_trains_one_by_one(tmp_path, store, capfd):
    kw = dict(student="tests.helpers:noisy_convnet", lrs=[0.05], temperatures=[2.0, 8.0], seeds=[0])
    swept = _sweep(tmp_path, store, "sweep", **kw)
    err = capfd.readouterr().err
    assert "cannot be stacked (it draws random numbers in training other than F.dropout" in err
    assert "one by one" in err
    for r in swept:
        alone = _sweep(tmp_path, store, f"alone-{r['run']}", **{**kw, "temperatures": [r["temperature"]]})
        wa, wb = _weights(r["dir"]), _weights(alone[0]["dir"])
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_students_vmap_cannot_run_train_one_by_one_with_a_note(tmp_path):
    corpus = tmp_path / "c.txt"
    from tests.helpers import write_corpus
    spec = write_corpus(corpus, paragraphs=40)
    p = run_kdcache("train-student", "--dataset", spec, "--student", "lstm:8,16", "--seed", "0,1", "--epochs", "1",
                    "--out", str(tmp_path / "lm"))
    assert "cannot be stacked" in p.stderr and "training them one by one" in p.stderr
    assert len(json.loads((tmp_path / "lm" / "summary.json").read_text())) == 2


def test_an_lr_sweep_from_the_command_line(tmp_path, store):
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", store, "--student", "mlp:8", "--lr", "0.01,0.1",
                    "--epochs", "1", "--out", str(tmp_path / "lr"))
    assert sorted(d.name for d in (tmp_path / "lr").iterdir() if d.is_dir()) == ["T4-a0.9-s0-lr0.01",
                                                                                  "T4-a0.9-s0-lr0.1"]
    assert "| lr |" in p.stdout and "| 0.1 |" in p.stdout


def test_the_stacked_loss_is_each_students_own_loss():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 12, 7, generator=g)
    z = torch.randn(12, 3, 7, generator=g) * 3
    y = torch.randint(0, 7, (12,), generator=g)
    y[:3] = -1  # unlabelled rows: soft term only
    temps, alphas = [1.0, 4.0, 4.0, 20.0], [0.0, 0.5, 1.0, 0.9]
    for ensemble, members in (("mean-prob", None), ("mean-logit", None), ("mean-prob", [0, 2])):
        got = distillation_losses(s, z, y, temps, alphas, ensemble, members)
        want = torch.stack([distillation_loss(s[i], z, y, t, a, ensemble, members)
                            for i, (t, a) in enumerate(zip(temps, alphas))])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    sparse = targets_from_arrays(_topk_manifest(), topk_rows(z[:, :1], 3, [1.0, 4.0, 20.0]))
    got = distillation_losses(s, sparse, y, temps, alphas)
    want = torch.stack([distillation_loss(s[i], sparse, y, t, a) for i, (t, a) in enumerate(zip(temps, alphas))])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # each student's gradient is its own loss's gradient
    s1 = s.clone().requires_grad_()
    distillation_losses(s1, z, y, temps, alphas).sum().backward()
    s2 = s[1].clone().requires_grad_()
    distillation_loss(s2, z, y, temps[1], alphas[1]).backward()
    torch.testing.assert_close(s1.grad[1], s2.grad, rtol=1e-5, atol=1e-7)


def _topk_manifest():
    from kdcache.store import Manifest
    return Manifest(num_samples=12, num_classes=7, num_members=1, dtype="float32", chunk_rows=12, layout="topk",
                    layout_params={"k": 3, "temperatures": [1.0, 4.0, 20.0]},
                    members=[{"name": "t", "spec": "t", "sha256": "0" * 64}],
                    dataset={"spec": "x", "name": "x", "split": None, "length": 12, "fingerprint": "0", "subset": None})


def test_a_stack_that_does_not_fit_the_memory_budget_trains_in_groups(tmp_path, store):
    # mlp:64,64 on 16 features, batch 64, SGD: about 280 kB per student (weights, gradients, momentum,
    # activations kept for backward); a 600 kB budget holds 2
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", store, "--student", "mlp:64,64",
                    "--temperature", "1,2,4,8", "--seed", "0,1", "--epochs", "1", "--batch-size", "64",
                    "--out", str(tmp_path / "mem"), env={"KDCACHE_STACK_MEMORY": "600kB"})
    assert "training the 8 students in 4 stacks of at most 2 (a stack of 8 needs about" in p.stderr
    assert "more than KDCACHE_STACK_MEMORY" in p.stderr
    assert len(json.loads((tmp_path / "mem" / "summary.json").read_text())) == 8
    p = run_kdcache("train-student", "--dataset", SYNTH, "--store", store, "--student", "mlp:8", "--epochs", "1",
                    "--temperature", "1,2", "--out", str(tmp_path / "bad"), env={"KDCACHE_STACK_MEMORY": "lots"},
                    check=False)
    assert p.returncode == 1 and "KDCACHE_STACK_MEMORY='lots': give a size such as 8GB" in p.stderr


@pytest.mark.parametrize("stack", [True, False])
def test_bf16_autocast_trains_students_on_cpu(tmp_path, store, stack):
    fp32 = _sweep(tmp_path, store, f"fp32-{stack}", lrs=[0.05], seeds=[0], stack=stack)
    bf16 = _sweep(tmp_path, store, f"bf16-{stack}", lrs=[0.05], seeds=[0], stack=stack, amp="bf16")
    for a, b in zip(fp32, bf16):
        history = json.loads((Path(b["dir"]) / "metrics.json").read_text())
        assert history[-1]["loss"] < history[0]["loss"]  # it trains
        assert b["loss"] == pytest.approx(a["loss"], rel=0.1)  # bf16 rounding, not another training
        assert abs(b["train_accuracy"] - a["train_accuracy"]) < 0.05
        wa, wb = _weights(a["dir"]), _weights(b["dir"])
        assert all(wb[k].dtype == torch.float32 for k in wb)  # weights stay fp32; only compute is bf16
        assert not torch.equal(wa["net.2.weight"], wb["net.2.weight"])


def test_logit_matching_is_a_sweep_axis_stacked_like_temperature(tmp_path, store):
    kw = dict(losses=["kd", "logit-mse"], temperatures=[2.0, 8.0], seeds=[0], lrs=[0.1], alphas=[0.9])
    stacked = _sweep(tmp_path, store, "stacked", **kw)
    alone = _sweep(tmp_path, store, "alone", stack=False, **kw)
    assert [r["run"] for r in stacked] == ["T2-a0.9-s0", "T8-a0.9-s0", "logit-mse-a0.9-s0"]  # one: it has no T
    assert [r["soft_loss"] for r in stacked] == ["kd", "kd", "logit-mse"] and stacked[2]["temperature"] is None
    for a, b in zip(stacked, alone):
        wa, wb = _weights(a["dir"]), _weights(b["dir"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    config = json.loads((tmp_path / "stacked" / "logit-mse-a0.9-s0" / "config.json").read_text())
    assert config["soft_loss"] == "logit-mse" and config["temperature"] is None and "losses" not in config
    w = {r["run"]: _weights(r["dir"])["net.2.weight"] for r in stacked}
    assert not torch.equal(w["T8-a0.9-s0"], w["logit-mse-a0.9-s0"])
    assert "| logit-mse-a0.9-s0 | logit-mse | - | 0.9 | 0 |" in (tmp_path / "stacked" / "summary.md").read_text()


def test_logit_matching_refusals_are_one_line(tmp_path, store):
    sparse = str(tmp_path / "top2.zarr")
    dump_logits(DumpConfig(teachers=["tests.helpers:slow_teacher"], dataset=SYNTH, out=sparse, layout="topk", k=2,
                           progress=False))
    base = ["train-student", "--dataset", SYNTH, "--student", "mlp:8", "--epochs", "1", "--out", str(tmp_path / "x")]
    for extra, said in ((["--store", sparse, "--loss", "logit-mse"],
                         f"--loss logit-mse matches every logit, and {sparse} is a topk store, which keeps only some "
                         f"of them; dump a dense store (--layout dense) for it, or use --loss kd"),
                        (["--store", store, "--loss", "kd,l2"], "--loss 'l2' is unknown; use one of kd, logit-mse"),
                        (["--loss", "logit-mse"], "--loss logit-mse needs --store (or an online --teacher)")):
        p = run_kdcache(*base, *extra, check=False)
        assert p.returncode == 1 and said in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_the_stacked_sgd_step_rounds_as_torch_optim_sgd_alone():
    """Each student's step in a stack is torch.optim.SGD's (momentum, its own learning rate) bit for bit,
    and a stopped student is left exactly as it was."""
    g = torch.Generator().manual_seed(0)
    lrs = [0.05, 0.2, 0.013]
    w = torch.randn(3, 40, 33, generator=g)
    stacked = {"w": w.clone()}
    opt = StackedOptimizer("sgd", stacked, lrs, 0.9, 0.0)
    alone = [torch.nn.Parameter(w[j].clone()) for j in range(3)]
    opts = [torch.optim.SGD([p], lr=lr, momentum=0.9) for p, lr in zip(alone, lrs)]
    for step in range(4):
        grad = torch.randn(3, 40, 33, generator=g)
        active = None if step < 2 else torch.tensor([True, False, True])
        opt.step([grad], active)
        for j in range(3):
            if active is None or active[j]:
                alone[j].grad = grad[j].clone()
                opts[j].step()
    for j in range(3):
        assert torch.equal(stacked["w"][j], alone[j].detach())


def test_cpu_stacks_hold_what_keeps_each_stacked_weight_under_32_mib():
    cpu = torch.device("cpu")
    assert cpu_stack_group(load_model("mlp:800,800", (28, 28), 10).module, cpu) == 13  # 800 x 800 fp32, 2.56 MB
    assert cpu_stack_group(load_model("mlp:30,30", (28, 28), 10).module, cpu) == 356  # 30 x 784, 94 kB
    # a weight over 32 MiB for one student costs the same per student in any stack: the others decide
    assert cpu_stack_group(load_model("mlp:12000,400", (28, 28), 10).module, cpu) == 1  # 400 x 12000, 19.2 MB
    assert cpu_stack_group(load_model("mlp:800,800", (28, 28), 10).module, torch.device("cuda")) is None
    assert cpu_stack_group(small_convnet(), cpu) is None  # other modules are not cut


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("small") / "t.zarr")
    dump_logits(DumpConfig(teachers=["tests.helpers:slow_teacher"], dataset=SYNTH, out=path, subset="0:128",
                           progress=False))
    return path


@pytest.mark.slow
def test_a_cpu_stack_is_cut_where_its_tensors_would_outgrow_the_heap(tmp_path, small_store, capfd):
    """16 students 800-800 (13 fit under 32 MiB) train as 2 stacks of 8 and end where one stack of 16
    (--stack-group 16) ends."""
    kw = dict(student="mlp:800,800", temperatures=[1.0, 2.0, 4.0, 8.0], seeds=[0, 1], lrs=[0.05, 0.1], epochs=1)
    auto = _sweep(tmp_path, small_store, "auto", **kw)
    err = capfd.readouterr().err
    assert ("training the 16 students in 2 stacks of at most 13 (on the CPU a larger stack makes tensors over "
            "32 MiB, which cost fresh memory pages every step; --stack-group sets the size)") in err
    assert err.count("8 students of mlp:800,800 train as one stacked model") == 2
    one = _sweep(tmp_path, small_store, "one", stack_group=16, **kw)
    assert "16 students of mlp:800,800 train as one stacked model" in capfd.readouterr().err
    assert [r["run"] for r in auto] == [r["run"] for r in one] and len(auto) == 16
    for a, b in zip(auto, one):
        wa, wb = _weights(a["dir"]), _weights(b["dir"])
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=2e-6)
