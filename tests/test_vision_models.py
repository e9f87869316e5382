"""Vision models as specs (``timm:``, ``torchvision:``, ``hf:`` image classifiers): built and loaded from
checkpoints, their own preprocessing, students that reload with plain timm / transformers, the bad
inputs refused in one line, and stacked students (BatchNorm, dropout) equal to the student alone."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

from kdcache.dump import DumpConfig, dump_logits  # noqa: E402
from kdcache.errors import SpecError  # noqa: E402
from kdcache.evaluate import EvalConfig, evaluate  # noqa: E402
from kdcache.specs import load_model, save_checkpoint  # noqa: E402
from kdcache.train import TrainConfig, train_students  # noqa: E402
from kdcache.vision.models import arch_of, model_preprocess, parse_value  # noqa: E402
from tests.conftest import run_kdcache  # noqa: E402

CLASSES = 5


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """48 RGB images 3x32x32 (uint8, read as floats in [0, 1]) of 5 classes, as an .npz dataset."""
    d = tmp_path_factory.mktemp("images")
    g = np.random.default_rng(0)
    y = np.arange(48) % CLASSES
    x = g.integers(0, 256, (48, 3, 32, 32), dtype=np.uint8)
    x[:, y % 3] //= 2  # classes differ a little in colour, so that there is something to learn
    path = d / "imgs.npz"
    np.savez(path, x=x, y=y)
    return str(path)


@pytest.fixture(scope="module")
def store(images, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("store") / "t.zarr")
    dump_logits(DumpConfig(teachers=["timm:resnet10t"], dataset=images, out=out, batch_size=16, progress=False))
    return out


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny transformers ViT classifier of 5 classes with its image processor, saved locally."""
    d = tmp_path_factory.mktemp("vit")
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, num_labels=CLASSES)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(d)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.45, 0.5],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(d)
    return str(d)


def _x(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_a_timm_spec_takes_the_datasets_classes_and_its_own_options():
    r = load_model("timm:test_resnet,drop_rate=0.25", num_classes=7)
    assert r.module.num_classes == 7 and r.module.drop_rate == 0.25
    assert r.module.eval()(_x()).shape == (2, 7)
    # the same seed builds the same weights; num_classes= is the dataset's number or refused
    again = load_model("timm:test_resnet,drop_rate=0.25,num_classes=7", num_classes=7, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(r.module.state_dict().values(), again.module.state_dict().values()))
    assert parse_value("3") == 3 and parse_value("0.5") == 0.5 and parse_value("False") is False
    assert parse_value("none") is None and parse_value("avg") == "avg"


def test_a_torchvision_spec_and_checkpoints_from_safetensors_and_torch_files(tmp_path):
    from safetensors.torch import save_file
    src = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r18.safetensors"))
    want = src(_x())
    for f in ("r18.pth", "r18.safetensors"):
        r = load_model(f"torchvision:resnet18,checkpoint={tmp_path / f}", num_classes=10)
        torch.testing.assert_close(r.module.eval()(_x()), want)
        assert r.arch == "torchvision:resnet18"  # a kdcache checkpoint holds the weights; the file is not needed
    assert arch_of("timm:resnet18,checkpoint=/a/b.safetensors,drop_rate=0.1") == "timm:resnet18,drop_rate=0.1"
    # a timm checkpoint of a training script (its weights under "state_dict", DDP's "module." prefix)
    m = timm.create_model("test_resnet", num_classes=CLASSES).eval()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in m.state_dict().items()}}, tmp_path / "t.pth")
    r = load_model(f"timm:test_resnet,checkpoint={tmp_path / 't.pth'}", num_classes=CLASSES)
    torch.testing.assert_close(r.module.eval()(_x()), m(_x()))


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    torch.save({"state_dict": torchvision.models.resnet18().state_dict(), "args": object()}, tmp_path / "p.pth")
    with pytest.raises(SpecError, match=r"cannot be read safely .*plain state dict"):
        load_model(f"torchvision:resnet18,checkpoint={tmp_path / 'p.pth'}", num_classes=10)


def test_unknown_names_suggest_the_closest(tmp_path):
    with pytest.raises(SpecError, match=r"timm has no model 'resnet1O'; closest: resnet18, "):
        load_model("timm:resnet1O", num_classes=10)
    with pytest.raises(SpecError, match=r"torchvision has no model 'resnet19'; closest: resnet18"):
        load_model("torchvision:resnet19", num_classes=10)
    with pytest.raises(SpecError, match=r"options are key=value"):
        load_model("timm:resnet18,big", num_classes=10)
    with pytest.raises(SpecError, match=r"does not take these options"):
        load_model("timm:test_resnet,flavour=3", num_classes=10)
    with pytest.raises(SpecError, match=r"downloads no weights; give checkpoint=PATH"):
        load_model("timm:test_resnet,pretrained=true", num_classes=10)
    with pytest.raises(SpecError, match=r"\{?dropout\}? is for kdcache's mlp: and lstm: models.*drop_rate=0.3"):
        load_model("timm:test_resnet", num_classes=10, dropout=0.3)


def test_a_model_of_another_number_of_classes_is_refused_naming_both(tmp_path, images):
    with pytest.raises(SpecError, match=r"has 1000 classes but the dataset has 10; drop num_classes="):
        load_model("timm:test_resnet,num_classes=1000", num_classes=10)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "in1k.pth")  # an ImageNet head
    with pytest.raises(SpecError, match=r"has a head of 1000 classes but the model is built with 5"):
        load_model(f"timm:test_resnet,checkpoint={tmp_path / 'in1k.pth'}", num_classes=CLASSES)
    # an unlabelled transfer set (no number of classes) takes the checkpoint's head as it is
    torch.save(timm.create_model("test_resnet", num_classes=7).state_dict(), tmp_path / "seven.pth")
    r = load_model(f"timm:test_resnet,checkpoint={tmp_path / 'seven.pth'}")
    assert r.module.eval()(_x()).shape == (2, 7)
    with pytest.raises(SpecError, match=r"does not fit this model \(missing \[\], unexpected "
                                        r"\['layer3.0.conv3.weight'.*\]\); give the "):
        load_model(f"timm:resnet10t,checkpoint={tmp_path / 'seven.pth'}")
    # the command line: one line, nothing written
    p = run_kdcache("dump-logits", "--dataset", images, "--teacher", "timm:test_resnet,num_classes=10",
                    "--out", str(tmp_path / "t.zarr"), check=False)
    assert p.returncode == 1 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "has 10 classes but the dataset has 5" in p.stderr and not (tmp_path / "t.zarr").exists()
    p = run_kdcache("dump-logits", "--dataset", images, "--teacher", "timm:resnet5O", "--out",
                    str(tmp_path / "t.zarr"), check=False)
    assert p.returncode == 1 and p.stderr.startswith("Error: ") and "closest: resnet50" in p.stderr
    assert p.stderr.strip().count("\n") == 0 and not (tmp_path / "t.zarr").exists()


def test_without_timm_or_torchvision_one_line_says_what_to_install(monkeypatch):
    for name in ("timm", "torchvision"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: import raises ImportError
        with pytest.raises(SpecError, match=rf"model spec '{name}:resnet18' needs {name}: "
                                            r"pip install 'kdcache\[vision\]'"):
            load_model(f"{name}:resnet18", num_classes=10)


def test_an_hf_image_classifier_takes_images_and_returns_logits(vit_dir, tmp_path):
    r = load_model(f"hf:{vit_dir}", num_classes=CLASSES)
    plain = transformers.AutoModelForImageClassification.from_pretrained(vit_dir).eval()
    torch.testing.assert_close(r.module.eval()(_x()), plain(pixel_values=_x()).logits)
    with pytest.raises(SpecError, match=rf"classifies 5 classes but the dataset has 10; give hf:{vit_dir},"
                                        r"num_classes=10"):
        load_model(f"hf:{vit_dir}", num_classes=10)
    fresh = load_model(f"hf:{vit_dir},num_classes=10", num_classes=10)
    assert fresh.module.eval()(_x()).shape == (2, 10)
    # a ResNet one (convolutions and BatchNorm) too
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "rn")
    assert load_model(f"hf:{tmp_path / 'rn'}", num_classes=3).module.eval()(_x()).shape == (2, 3)


def test_model_preprocess_is_the_models_own():
    want = {"size": 160, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 0.95}
    assert model_preprocess("timm:test_resnet") == want
    assert model_preprocess(timm.create_model("test_resnet")) == want
    p = model_preprocess("timm:resnet10t,drop_rate=0.1")
    assert p["size"] == 176 and p["interpolation"] == "bicubic" and p["crop_pct"] == 0.875
    torch.testing.assert_close(p["mean"], [0.485, 0.456, 0.406]) and torch.testing.assert_close(
        p["std"], [0.229, 0.224, 0.225])
    assert model_preprocess("timm:test_vit,img_size=64")["size"] == 64
    assert model_preprocess(load_model("torchvision:resnet18", num_classes=10).module) is None
    assert model_preprocess("torchvision:resnet18") is None and model_preprocess("mlp:10") is None


def test_model_preprocess_of_hf_image_processors(vit_dir, tmp_path):
    want = {"size": 32, "mean": [0.4, 0.45, 0.5], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear",
            "crop_pct": 1.0}
    assert model_preprocess(f"hf:{vit_dir}") == want
    assert model_preprocess(load_model(f"hf:{vit_dir}", num_classes=CLASSES).module) == want
    # ConvNeXt's processor: shortest edge and crop_pct, bicubic; BEiT/DeiT style: resize then a centre crop
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(tmp_path / "c")
    got = model_preprocess(f"hf:{tmp_path / 'c'}")
    assert (got["size"], got["crop_pct"], got["interpolation"]) == (224, 0.875, "bicubic")
    transformers.ViTImageProcessor(size={"height": 256, "width": 256}, do_center_crop=True,
                                   crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "preprocessor_config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "d" / "preprocessor_config.json").read_text()), "do_center_crop": True,
         "crop_size": {"height": 224, "width": 224}, "resample": 3}))
    got = model_preprocess(f"hf:{tmp_path / 'd'}")
    assert (got["size"], got["crop_pct"], got["interpolation"]) == (224, 224 / 256, "bicubic")


def _train(images, store, out, student, **kw):
    base = dict(dataset=images, student=student, out=str(out), store=store, epochs=2, batch_size=16, lrs=[0.05],
                progress=False, device="cpu")
    return train_students(TrainConfig(**{**base, **kw}))


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_model(str(run_dir)).module.state_dict()


def test_a_timm_student_reloads_with_plain_timm(images, store, tmp_path):
    _train(images, store, tmp_path / "run", "timm:test_resnet,drop_rate=0.1", epochs=1)
    run = tmp_path / "run"
    from safetensors.torch import load_file
    keys = set(load_file(str(run / "model.safetensors")))
    assert keys == set(timm.create_model("test_resnet", num_classes=CLASSES).state_dict())  # no wrapper prefix
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["model_args"]["drop_rate"] == 0.1
    assert config["student"] == "timm:test_resnet,drop_rate=0.1" and config["num_classes"] == CLASSES
    assert model_preprocess(str(run)) == model_preprocess("timm:test_resnet")  # the run's is its model's
    plain = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    # (the overlay's num_classes too: else timm drops a head of other than the pretrained_cfg's classes)
    overlay = timm.create_model("test_resnet", pretrained=True, num_classes=CLASSES, pretrained_cfg_overlay=dict(
        file=str(run / "model.safetensors"), num_classes=CLASSES)).eval()
    ours = load_model(str(run)).module.eval()
    x = torch.from_numpy(np.load(images)["x"][:16]).float() / 255
    # the run directory is a checkpoint= of the spec too (a student as the next teacher)
    again = load_model(f"timm:test_resnet,checkpoint={run}", num_classes=CLASSES).module.eval()
    with torch.no_grad():
        logits = ours(x)
        torch.testing.assert_close(plain(x), logits)
        torch.testing.assert_close(overlay(x), logits)
        torch.testing.assert_close(again(x), logits)
        everything = plain(torch.from_numpy(np.load(images)["x"]).float() / 255)
    # kdcache evaluate on the run directory makes exactly the errors plain timm's logits make
    y = np.load(images)["y"]
    wrong = everything.argmax(1).numpy() != y
    got = evaluate(EvalConfig(model=str(run), dataset=images, device="cpu"))
    assert got["eval_errors"] == int(wrong.sum())
    assert got["errors_by_class"] == [int(wrong[y == c].sum()) for c in range(CLASSES)]


def test_an_hf_image_student_reloads_with_plain_transformers(images, store, vit_dir, tmp_path, capfd):
    """Two ViT students stacked (each the student alone), each run reloading with transformers alone."""
    _train(images, store, tmp_path / "sweep", f"hf:{vit_dir}", epochs=1, seeds=[0, 1], lrs=[0.01])
    assert f"2 students of hf:{vit_dir} train as one stacked model (torch.func vmap)" in capfd.readouterr().err
    _train(images, store, tmp_path / "alone", f"hf:{vit_dir}", epochs=1, seeds=[1], lrs=[0.01])
    alone = _weights(tmp_path / "alone")
    for k, v in _weights(tmp_path / "sweep" / "T4-a0.9-s1").items():
        torch.testing.assert_close(v, alone[k], rtol=1e-4, atol=1e-5)
    run = tmp_path / "sweep" / "T4-a0.9-s0"
    from safetensors.torch import load_file
    plain = transformers.AutoModelForImageClassification.from_pretrained(run / "hf").eval()
    assert set(load_file(str(run / "model.safetensors"))) == set(plain.state_dict())
    start = transformers.AutoModelForImageClassification.from_pretrained(vit_dir)
    assert not torch.equal(plain.classifier.weight, start.classifier.weight)  # it trained
    x = torch.from_numpy(np.load(images)["x"][:8]).float() / 255
    with torch.no_grad():
        torch.testing.assert_close(plain(pixel_values=x).logits, load_model(str(run)).module.eval()(x))
    # its image processor goes with it, so the run's preprocessing is the model's
    assert list(transformers.AutoImageProcessor.from_pretrained(run / "hf").image_mean) == [0.4, 0.45, 0.5]
    assert model_preprocess(str(run)) == model_preprocess(f"hf:{vit_dir}")
    # kdcache's checkpoint written from a module that is not wrapped keeps its keys as they are
    save_checkpoint(plain, tmp_path / "c", "x:y", (3, 32, 32), CLASSES)
    assert set(load_file(str(tmp_path / "c" / "model.safetensors"))) == set(plain.state_dict())


@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_stacked_batchnorm_students_are_each_the_student_alone(images, store, tmp_path, drop_rate, capfd):
    """timm's test_resnet (BatchNorm: running statistics per student in the stack), with and without
    dropout (each student's masks from its own generator): a stack of 2 gives each student the weights
    and BatchNorm statistics it gets alone."""
    spec = f"timm:test_resnet,drop_rate={drop_rate:g}"
    # small steps: at lr 0.05 a near tie (ReLU, max-pool) that float rounding of the batched convolution
    # decides the other way can move a weight by ~3e-5 now and then; the stack itself computes the same
    lr = dict(lrs=[0.01])
    stacked = _train(images, store, tmp_path / "stacked", spec, seeds=[0, 2], epochs=2, **lr)
    err = capfd.readouterr().err
    assert "2 students of " + spec + " train as one stacked model (torch.func vmap" in err
    assert ("each student's dropout masks drawn from its own generator" in err) == (drop_rate > 0)
    for r in stacked:
        alone = _train(images, store, tmp_path / f"alone-{r['seed']}", spec, seeds=[r["seed"]], epochs=2, **lr)
        wa, wb = _weights(r["dir"]), _weights(alone[0]["dir"])
        assert any("running_var" in k for k in wa)
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    if drop_rate:  # the dropout is real: without it the same student ends elsewhere
        plain = _train(images, store, tmp_path / "nodrop", "timm:test_resnet", seeds=[0], epochs=2, **lr)
        assert not torch.allclose(_weights(plain[0]["dir"])["fc.weight"], _weights(stacked[0]["dir"])["fc.weight"],
                                  atol=1e-3)


def test_stochastic_depth_cannot_stack_and_says_why(images, store, tmp_path, capfd):
    _train(images, store, tmp_path / "dp", "timm:test_resnet,drop_path_rate=0.2", seeds=[0, 1], epochs=1)
    err = capfd.readouterr().err
    assert ("cannot be stacked (it draws random numbers in training other than F.dropout (e.g. stochastic depth)"
            in err) and "training them one by one" in err


def test_the_weights_sha256_of_library_models_is_formats_recipe(vit_dir):
    """FORMAT.md's weights sha256 recomputed with hashlib: timm's keys as they are (BatchNorm's scalar
    ``num_batches_tracked`` included), an hf image classifier's under ``model.``."""
    import hashlib

    def recipe(state: dict[str, torch.Tensor]) -> str:
        h = hashlib.sha256()
        for k in sorted(state):
            t = state[k].contiguous()
            h.update(f"{k};{t.dtype};{tuple(t.shape)};".encode())
            h.update(t.numpy().tobytes())
        return h.hexdigest()
    r = load_model("timm:test_resnet", num_classes=CLASSES)
    state = timm.create_model("test_resnet", num_classes=CLASSES).state_dict()
    assert any(v.ndim == 0 for v in state.values())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = timm.create_model("test_resnet", num_classes=CLASSES).state_dict()
    assert r.describe()["sha256"] == recipe(state)
    plain = transformers.AutoModelForImageClassification.from_pretrained(vit_dir).state_dict()
    got = load_model(f"hf:{vit_dir}", num_classes=CLASSES).describe()["sha256"]
    assert got == recipe({f"model.{k}": v for k, v in plain.items()})


def test_a_checkpoint_path_in_a_timm_spec_is_recorded_relative_to_the_store(tmp_path):
    from kdcache.datasets import portable_model_spec, recorded_model_spec
    (tmp_path / "models").mkdir()
    ckpt = tmp_path / "models" / "t.safetensors"
    ckpt.write_bytes(b"x")
    store = str(tmp_path / "stores" / "s.zarr")
    spec = f"timm:resnet10t,checkpoint={ckpt},drop_rate=0.1"
    recorded = portable_model_spec(spec, store)
    assert recorded == "timm:resnet10t,checkpoint=../models/t.safetensors,drop_rate=0.1"
    assert recorded_model_spec(recorded, store) == spec
    assert portable_model_spec("timm:resnet10t", store) == "timm:resnet10t"


def test_a_last_batch_of_one_row_for_batchnorm_is_one_line(tmp_path):
    from tests.conftest import run_kdcache
    x = np.random.default_rng(0).integers(0, 255, (9, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(9) % 3)
    r = run_kdcache("train-student", "--dataset", str(tmp_path / "d.npz"), "--student", "timm:test_resnet",
                    "--batch-size", "4", "--epochs", "1", "--out", str(tmp_path / "r"), check=False)
    assert r.returncode == 1 and "a batch of 1 row cannot train a student with BatchNorm" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
