"""Datasets of image files (imagefolder:, hf-image:), views cut from each original image, the file
listing fingerprint, preprocessing recorded with the data, and their refusals."""
from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("PIL")

from kdcache.datasets import load_dataset, recorded_spec  # noqa: E402
from kdcache.defaults import completed_spec  # noqa: E402
from kdcache.dump import DumpConfig, dump_logits  # noqa: E402
from kdcache.errors import KdcacheError, SpecError  # noqa: E402
from kdcache.store import open_store  # noqa: E402
from kdcache.stream import DistillStream, check_pairing  # noqa: E402
from kdcache.teacher_check import check_teacher  # noqa: E402
from kdcache.views import epoch_view  # noqa: E402
from kdcache.vision.synth import render_digits  # noqa: E402
from tests import helpers  # noqa: E402
from tests.conftest import DATA_ROOT, invoke_kdcache, run_kdcache  # noqa: E402

TEACHER = "tests.helpers:rgb_teacher"
RECORDING = "tests.helpers:recording_rgb_teacher"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """60 digit images (6 per class) of 24..96 pixels a side, PNG and JPEG, some grayscale and RGBA."""
    return render_digits(tmp_path_factory.mktemp("img") / "digits", 6, "test", 24, 96, seed=3, data_root=DATA_ROOT)


def _copy(folder, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_imagefolder_lists_classes_files_and_preprocesses(folder, capsys):
    data = load_dataset(f"imagefolder:{folder},size=20")
    assert len(data) == 60 and data.num_classes == 10 and data.class_names == [str(i) for i in range(10)]
    assert data.input_shape == (3, 20, 20)
    x, y = data.dataset.get_batch(np.arange(0, 60, 6))
    assert x.dtype == torch.float32 and y.tolist() == list(range(10))
    sizes = {tuple(data.dataset.original(i).shape) for i in range(60)}
    assert len(sizes) > 20 and all(s[0] == 3 for s in sizes)  # every original is RGB, sizes vary
    assert "converted to RGB" in capsys.readouterr().err  # said once, not per image
    plain = load_dataset(f"imagefolder:{folder},labels=none,size=20")
    assert plain.num_classes is None and (plain.dataset.get_batch(np.arange(3))[1] == -1).all()
    assert plain.fingerprint != data.fingerprint
    # the default is the evaluation transform: shorter side to floor(size / crop_pct), centre crop
    import torchvision.transforms.v2.functional as tvf
    img = data.dataset.original(7)
    want = tvf.center_crop(tvf.resize(img, [int(20 / 0.875)], antialias=True), [20, 20])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.equal(data.dataset.get_batch([7])[0][0], (want.float() / 255 - mean) / std)


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_views_cut_from_originals_replay_bit_for_bit(folder, tmp_path, suffix):
    """Every view the stream replays is bit for bit the input the teacher was given; boxes lie in each
    original image; the live teacher gives the stored logits."""
    helpers.SEEN_INPUTS.clear()
    spec = f"imagefolder:{folder},size=24"
    out = str(tmp_path / f"v{suffix}")
    dump_logits(DumpConfig(teachers=[RECORDING], dataset=spec, out=out, augment="resized-crop:0.2+flip", views=3,
                           chunk_rows=32, batch_size=20, dtype="float32", progress=False, seed=5))
    seen = torch.cat(helpers.SEEN_INPUTS[1:])  # the first call is the dump's probe of the output shape
    s = open_store(out)
    m = s.manifest
    assert m.views["originals"] is True and m.num_samples == 180 and len(seen) == 180
    assert m.dataset["preprocess"]["size"] == 24 and m.class_names == [str(i) for i in range(10)]
    block = s.read(0, 180)
    data = load_dataset(recorded_spec(m.dataset["spec"], out))  # relative to the store
    hw = np.array([data.dataset.original(int(i)).shape[-2:] for i in block.sample_ids[:60]] * 3)
    top, left, h, w, flip = block.data["view_params"].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all()
    assert (h * w >= 0.2 * hw.prod(1) * 0.8).all() and set(flip) == {0.0, 1.0}
    assert len(np.unique(block.data["view_params"], axis=0)) == 180
    ids = block.sample_ids[:60]
    stream = DistillStream(s, load_dataset(completed_spec(spec, store=out)), 16, seed=0, return_ids=True)
    for epoch in range(3):
        stream.set_epoch(epoch)
        v, rows = epoch_view(0, epoch, 3), 0
        for x, _y, _z, sid in stream:
            pos = v * 60 + np.searchsorted(ids, sid.numpy())
            assert torch.equal(x, seen[pos]), f"view {v}: replayed inputs differ from the teacher's"
            rows += len(x)
        assert rows == 60
    found = check_teacher(out, [TEACHER], rows=90)
    assert found.ok and set(found.views) == {0, 1, 2} and found.max_abs_diff < 1e-4


def test_crop_random_crop_and_a_user_augmentation_on_images(folder, tmp_path):
    spec = f"imagefolder:{folder},size=16"
    for aug in ("crop:4+flip", "random-crop:20", "resized-crop:0.5,1,0.5,2+flip+random-crop:10",
                "tests.helpers:brightness"):
        out = str(tmp_path / f"{aug.replace(':', '_').replace('+', '_')}.zarr")
        dump_logits(DumpConfig(teachers=[TEACHER], dataset=spec, out=out, augment=aug, views=2, progress=False))
        found = check_teacher(out, [TEACHER], rows=40)
        assert found.ok and found.max_abs_diff < 1e-2, aug
        views = open_store(out).manifest.views
        assert views.get("originals", False) is (aug != "tests.helpers:brightness")


def test_online_views_equal_the_cached_ones_and_students_train(folder, tmp_path):
    spec = f"imagefolder:{folder},size=16"
    out = str(tmp_path / "v.zarr")
    run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", spec, "--augment", "resized-crop:0.3+flip",
                "--views", "2", "--seed", "4", "--out", out)
    from kdcache.stream import DatasetStream
    from kdcache.views import Views
    data = load_dataset(completed_spec(spec, store=out))
    cached = DistillStream(out, data, 20, seed=1, return_ids=True, shuffle=False)
    online = DatasetStream(data, 20, indices=np.arange(60), seed=1, return_ids=True, shuffle=False,
                           views=Views.from_manifest(open_store(out).manifest.views, out))
    for epoch in range(2):
        cached.set_epoch(epoch)
        online.set_epoch(epoch)
        for (xa, _, _, ia), (xb, _, _, ib) in zip(cached, online):
            assert torch.equal(ia, ib) and torch.equal(xa, xb)
    run = tmp_path / "student"  # the store's preprocessing is used: the spec gives none
    run_kdcache("train-student", "--dataset", f"imagefolder:{folder}", "--store", out, "--student", "mlp:16",
                "--epochs", "2", "--out", str(run))
    config = json.loads((run / "config.json").read_text())
    assert config["dataset_identity"]["preprocess"]["size"] == 16
    r = run_kdcache("evaluate", str(run), "--dataset", f"imagefolder:{folder}")  # the student's own
    assert "errors of 60" in r.stdout
    online_run = tmp_path / "online"
    run_kdcache("train-student", "--dataset", spec, "--teacher", TEACHER, "--augment", "resized-crop:0.3+flip",
                "--views", "2", "--augment-seed", "4", "--student", "mlp:16", "--epochs", "2", "--out",
                str(online_run))
    views = json.loads((online_run / "config.json").read_text())["store_identity"]["views"]
    assert views["originals"] is True


def test_other_preprocessing_than_the_store_is_said(folder, tmp_path, capsys):
    out = str(tmp_path / "s.zarr")
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=f"imagefolder:{folder},size=16", out=out, progress=False))
    assert completed_spec(f"imagefolder:{folder}", store=out).count("size=16") == 1
    completed_spec(f"imagefolder:{folder},mean=0.5/0.5/0.5", store=out)
    assert "sets mean other than the teacher saw" in capsys.readouterr().err


def test_a_changed_added_or_renamed_file_is_refused_naming_it(folder, tmp_path):
    d = _copy(folder, tmp_path)
    out = str(tmp_path / "s.zarr")
    spec = f"imagefolder:{d},size=16"
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=spec, out=out, progress=False))
    store = open_store(out)
    check_pairing(store, load_dataset(spec))  # unchanged: accepted
    victim = sorted((d / "4").iterdir())[2]
    with open(victim, "ab") as f:
        f.write(b"\0")
    with pytest.raises(KdcacheError, match=f"file '{victim}' was added, renamed or changed"):
        check_pairing(store, load_dataset(spec))
    victim.rename(victim.with_name("renamed" + victim.suffix))
    with pytest.raises(KdcacheError, match="renamed or changed"):
        check_pairing(store, load_dataset(spec))
    shutil.copy(sorted((d / "5").iterdir())[0], d / "5" / "extra.png")
    with pytest.raises(KdcacheError, match="61 image files now and had 60"):
        check_pairing(store, load_dataset(spec))
    r = run_kdcache("train-student", "--dataset", spec, "--store", out, "--student", "mlp:8", "--out",
                    str(tmp_path / "r"), check=False)
    assert r.returncode == 1 and "image files now and had 60" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_images_and_folders_are_one_line_and_write_nothing(folder, tmp_path):
    d = _copy(folder, tmp_path)
    victim = sorted((d / "2").glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated
    out = tmp_path / "bad.zarr"  # the chunks before the bad file are kept (the store is resumable)
    for i, content in enumerate((victim.read_bytes()[:200], b"not an image at all")):
        victim.write_bytes(content)
        r = invoke_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", f"imagefolder:{d},size=16", "--out",
                           str(tmp_path / f"bad{i}.zarr"), "--batch-size", "8")
        errors = [line for line in r.stderr.splitlines() if not line.startswith("note:")]
        assert r.returncode == 1 and len(errors) == 1 and f"image '{victim}' cannot be decoded" in errors[0]
    victim.unlink()
    (d / "empty").mkdir()
    r = invoke_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", f"imagefolder:{d}", "--out", str(out))
    assert r.returncode == 1 and "class folder" in r.stderr and "has no image files" in r.stderr
    (d / "empty").rmdir()
    r = invoke_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", f"imagefolder:{d},size=16", "--out",
                       str(out), "--augment", "random-crop:90")
    assert r.returncode == 1 and "cannot cut a view from image" in r.stderr and "at least 90x90" in r.stderr
    for bad, want in ((f"imagefolder:{tmp_path / 'nowhere'}", "does not exist"),
                      (f"imagefolder:{d},labels=maybe", "labels=none"),
                      (f"imagefolder:{d},size=big", "size is an integer"),
                      (f"imagefolder:{d},interpolation=lanczos9", "use one of bilinear")):
        r = invoke_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", bad, "--out", str(out))
        assert r.returncode == 1 and want in r.stderr, (bad, r.stderr)
    r = invoke_kdcache("dump-logits", "--teacher", "tests.helpers:rgb_teacher_5", "--dataset",
                       f"imagefolder:{d},size=16", "--out", str(out))
    assert r.returncode == 1 and "gives 5 classes" in r.stderr
    assert not out.exists()


def _hf_inputs(folder, tmp_path):
    """The first 20 PNG files of the folder as parquet, save_to_disk and a WebDataset tar shard."""
    datasets = pytest.importorskip("datasets")
    files = sorted(p for p in folder.glob("*/*.png"))[:20]
    labels = [int(p.parent.name) for p in files]
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in files],
                                     "label": labels}, features=feats)
    ds.to_parquet(str(tmp_path / "imgs.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000.tar", "w") as t:
        for i, p in enumerate(files):
            for name, data in ((f"{i:05d}.png", p.read_bytes()), (f"{i:05d}.cls", str(labels[i]).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return files, labels


def test_hf_image_reads_parquet_saved_and_webdataset_as_the_files(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    files, labels = _hf_inputs(folder, tmp_path)
    ref = load_dataset(f"imagefolder:{folder},size=16")
    names = ref.dataset.source.names
    want = ref.dataset.get_batch([names.index(f"{p.parent.name}/{p.name}") for p in files])[0]
    for spec in (f"hf-image:{tmp_path / 'imgs.parquet'},size=16", f"hf-image:{tmp_path / 'saved'},size=16",
                 f"hf-image:{tmp_path / 'wds'},image=png,label=cls,size=16"):
        data = load_dataset(spec)
        x, y = data.dataset.get_batch(np.arange(20))
        assert torch.equal(x, want) and y.tolist() == labels, spec
    out = str(tmp_path / "hf.zarr")
    spec = f"hf-image:{tmp_path / 'imgs.parquet'},size=16"
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=spec, out=out, augment="resized-crop:0.3", views=2,
                           progress=False))
    assert check_teacher(out, [TEACHER], rows=40).ok
    r = invoke_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", f"hf-image:{tmp_path / 'saved'},image=pix",
                       "--out", str(tmp_path / "x.zarr"))
    assert r.returncode == 1 and "no image column 'pix'" in r.stderr
    with pytest.raises(SpecError, match="names 10 classes in its label feature, not classes=5; drop classes="):
        load_dataset(f"hf-image:{tmp_path / 'imgs.parquet'},classes=5")


def test_webdataset_shards_at_a_url_read_as_the_local_shard(folder, tmp_path, monkeypatch, capsys):
    """A tar shard served over HTTP on loopback (a real server, as a bucket's public URL or a CDN would
    serve it) gives the images of the same shard read from disk; a URL the server has no file for is
    one line. Labels without class names: the count from the largest label, said, or ``classes=N``."""
    import functools
    import http.server
    import threading
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    files, labels = _hf_inputs(folder, tmp_path)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "wds"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-000.tar"
        remote = load_dataset(f"hf-image:{url},image=png,label=cls,size=16")
        local = load_dataset(f"hf-image:{tmp_path / 'wds' / 'shard-000.tar'},image=png,label=cls,size=16")
        x, y = remote.dataset.get_batch(np.arange(20))
        want, want_y = local.dataset.get_batch(np.arange(20))
        assert torch.equal(x, want) and y.tolist() == want_y.tolist() == labels
        assert remote.dataset.source.header == f"webdataset:{url}"  # the URL as given identifies the data
        top = max(labels)
        assert top < 9 and remote.num_classes == top + 1  # the shard holds no row of the last classes
        assert f"{top + 1} taken from its largest label ({top}); give classes=N" in capsys.readouterr().err
        assert load_dataset(f"hf-image:{url},image=png,label=cls,classes=10,size=16").num_classes == 10
        with pytest.raises(SpecError, match=f"has label {top}, outside classes=2; give classes={top + 1} or more"):
            load_dataset(f"hf-image:{url},image=png,label=cls,classes=2,size=16")
        with pytest.raises(SpecError, match="cannot be read as webdataset .Unable to find"):  # the server's 404
            load_dataset(f"hf-image:{url.replace('shard-000', 'shard-001')},image=png,label=cls,size=16")
    finally:
        server.shutdown()
        server.server_close()


def test_skip_bad_images_lists_them_and_training_never_sees_them(folder, tmp_path):
    d = _copy(folder, tmp_path)
    bad = [sorted((d / "3").glob("*.png"))[1], sorted((d / "8").glob("*.jpg"))[0]]
    for b in bad:
        b.write_bytes(b.read_bytes()[:150])
    spec = f"imagefolder:{d},size=16"
    out = str(tmp_path / "skip.zarr")
    r = run_kdcache("dump-logits", "--teacher", TEACHER, "--dataset", spec, "--out", out, "--augment",
                    "resized-crop:0.3", "--views", "2", "--skip-bad-images")
    names = load_dataset(spec).dataset.source.names
    want = sorted(names.index(f"{b.parent.name}/{b.name}") for b in bad)
    s = open_store(out)
    assert s.manifest.skipped == want and "2 unreadable images skipped" in r.stdout
    assert r.stderr.count("skipping: image") == 4  # each bad file, once per view
    ids, labels = s.read_index(0, 120)
    assert set(ids[labels == -2]) == set(want) and (labels[~np.isin(ids, want)] >= 0).all()
    assert check_teacher(out, [TEACHER], rows=120).ok  # the skipped rows are not compared
    stream = DistillStream(s, load_dataset(completed_spec(spec, store=out)), 16, seed=0, return_ids=True)
    seen = np.concatenate([sid.numpy() for *_, sid in stream])
    assert len(seen) == 58 and not np.isin(seen, want).any()
    run = tmp_path / "student"
    run_kdcache("train-student", "--dataset", f"imagefolder:{d}", "--store", out, "--student", "mlp:8",
                "--epochs", "2", "--out", str(run))
    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["samples_seen"] for m in metrics] == [58, 58] and all(m["coverage_ok"] for m in metrics)
    r = invoke_kdcache("dump-logits", "--teacher", "tests.helpers:image_teacher", "--dataset", "mnist:test",
                       "--subset", "0:10", "--out", str(tmp_path / "m.zarr"), "--skip-bad-images")
    assert r.returncode == 1 and "applies to datasets of image files" in r.stderr


def test_a_torchvision_v2_transform_records_its_drawn_parameters(folder, tmp_path):
    from torchvision.transforms import v2

    from kdcache.vision.transforms import recorded
    jitter = recorded(v2.ColorJitter(0.4, 0.4, 0.4, 0.1))
    assert jitter.columns == ("fn_idx.0", "fn_idx.1", "fn_idx.2", "fn_idx.3", "brightness_factor",
                              "contrast_factor", "saturation_factor", "hue_factor")
    g = torch.Generator().manual_seed(3)
    p = jitter.sample(g, 4, (3, 8, 8))
    x = torch.rand(4, 3, 8, 8)
    order = [int(v) for v in p[1, :4]]
    want = v2.ColorJitter(0.4, 0.4, 0.4, 0.1).transform(x[1], {
        "fn_idx": torch.tensor(order), "brightness_factor": float(p[1, 4]), "contrast_factor": float(p[1, 5]),
        "saturation_factor": float(p[1, 6]), "hue_factor": float(p[1, 7])})
    assert torch.equal(jitter.apply(x, p)[1], want) and sorted(order) == [0, 1, 2, 3]
    flip = recorded(v2.RandomHorizontalFlip())
    fp = flip.sample(torch.Generator().manual_seed(0), 64, (3, 8, 8))
    assert flip.columns == ("applied",) and 10 < fp.sum() < 54
    out = flip.apply(x[:1].expand(64, -1, -1, -1), fp)
    assert all(torch.equal(o, x[0].flip(-1) if a else x[0]) for o, a in zip(out, fp[:, 0]))
    store = str(tmp_path / "v2.zarr")
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=f"imagefolder:{folder},size=16", out=store,
                           augment="tests.helpers:v2_color_jitter", views=2, dtype="float32", progress=False))
    m = open_store(store).manifest
    assert m.views["columns"] == list(jitter.columns) and not m.views.get("originals")
    found = check_teacher(store, [TEACHER], rows=60)
    assert found.ok and found.max_abs_diff < 1e-5


def test_hf_image_data_copied_elsewhere_is_the_same_data(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    _hf_inputs(folder, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(tmp_path / "imgs.parquet", tmp_path / "elsewhere" / "imgs.parquet")
    shutil.copytree(tmp_path / "saved", tmp_path / "elsewhere" / "saved")
    for name in ("imgs.parquet", "saved"):
        a = load_dataset(f"hf-image:{tmp_path / name},size=16").fingerprint
        assert a == load_dataset(f"hf-image:{tmp_path / 'elsewhere' / name},size=16").fingerprint, name


def test_preprocessing_left_out_comes_from_the_teacher(folder):
    pytest.importorskip("timm")
    spec = completed_spec(f"imagefolder:{folder}", ["timm:test_resnet"])
    assert spec.endswith(",size=160,mean=0.5/0.5/0.5,std=0.5/0.5/0.5,interpolation=bilinear,crop_pct=0.95")
    given = completed_spec(f"imagefolder:{folder},size=32,crop_pct=1.0", ["timm:test_resnet"])
    assert ",size=32," in given and given.endswith("crop_pct=1.0") and "mean=0.5/0.5/0.5" in given
    assert completed_spec(f"imagefolder:{folder}", ["mlp:8"]).endswith(
        "size=224,mean=0.485/0.456/0.406,std=0.229/0.224/0.225,interpolation=bilinear,crop_pct=0.875")


def test_a_dump_stopped_by_a_bad_file_resumes_with_its_chunks_kept(folder, tmp_path):
    d = _copy(folder, tmp_path)
    names = load_dataset(f"imagefolder:{d},size=16").dataset.source.names
    victim = d / names[45]  # in the last chunks: the ones before it are written when the dump stops
    victim.write_bytes(victim.read_bytes()[:120])
    out = str(tmp_path / "r.zarr")
    cmd = ("dump-logits", "--teacher", TEACHER, "--dataset", f"imagefolder:{d},size=16", "--out", out,
           "--augment", "resized-crop:0.3", "--views", "2", "--chunk-rows", "8", "--batch-size", "8")
    r = run_kdcache(*cmd, check=False)
    assert r.returncode == 1 and str(victim) in r.stderr
    kept = int(open_store(out, allow_partial=True).written_chunks().sum())
    assert kept >= 5
    r = run_kdcache(*cmd, "--skip-bad-images")
    assert f"{kept} chunks kept from an earlier run" in r.stdout and "1 unreadable image skipped" in r.stdout
    assert open_store(out).manifest.skipped == [45]


def test_a_timm_student_reloaded_with_timm_says_the_preprocessing_it_was_trained_with(folder, tmp_path):
    timm = pytest.importorskip("timm")
    spec = f"imagefolder:{folder},size=16,mean=0.5/0.5/0.5,std=0.25/0.25/0.25"
    out = str(tmp_path / "s.zarr")
    dump_logits(DumpConfig(teachers=[TEACHER], dataset=spec, out=out, progress=False))
    run = tmp_path / "r"
    run_kdcache("train-student", "--dataset", f"imagefolder:{folder}", "--store", out, "--student",
                "timm:test_resnet", "--epochs", "1", "--batch-size", "16", "--out", str(run))
    plain = timm.create_model(f"local-dir:{run}", pretrained=True)
    cfg = timm.data.resolve_data_config(model=plain)
    assert tuple(cfg["input_size"]) == (3, 16, 16) and tuple(cfg["mean"]) == (0.5, 0.5, 0.5)
    assert tuple(cfg["std"]) == (0.25, 0.25, 0.25)
    assert cfg["crop_pct"] == 0.875
