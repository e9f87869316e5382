"""``kdcache render-digits``: an ImageFolder of real PNG/JPEG files of varied sizes from MNIST on disk, the
pipeline step that builds pipelines/images_timm.yaml's data; refusals leave what is there as it was."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from kdcache.datasets import load_dataset
from tests.conftest import invoke_kdcache


def test_render_digits_writes_an_image_folder_of_varied_files(tmp_path):
    out = tmp_path / "digits"
    p = invoke_kdcache("render-digits", str(out), "--per-class", "5", "--split", "test", "--min-side", "30",
                       "--max-side", "90", "--seed", "3")
    assert p.returncode == 0, p.stdout
    assert "wrote 50 images (5 per digit, MNIST test, sides 30-90 px)" in p.stdout
    assert sorted(d.name for d in out.iterdir()) == [str(d) for d in range(10)]
    files = sorted(out.rglob("*.*"))
    assert len(files) == 50 and {f.suffix for f in files} == {".png", ".jpg"}
    shapes, modes = set(), set()
    for f in files:
        with Image.open(f) as im:
            shapes.add(im.size)
            modes.add(im.mode)
            assert 30 <= min(im.size) and max(im.size) <= 90
    assert len(shapes) > 40 and modes == {"RGB", "L", "RGBA"}
    data = load_dataset(f"imagefolder:{out},size=24")
    assert data.num_classes == 10 and data.class_names == [str(d) for d in range(10)]
    x, y = data.dataset.get_batch(np.arange(0, 50, 5))
    assert tuple(x.shape) == (10, 3, 24, 24) and y.tolist() == list(range(10))
    # the same seed gives the same files, another seed others
    again = tmp_path / "again"
    invoke_kdcache("render-digits", str(again), "--per-class", "5", "--split", "test", "--min-side", "30",
                   "--max-side", "90", "--seed", "3")
    assert all(f.read_bytes() == (again / f.relative_to(out)).read_bytes() for f in files)


def test_render_digits_refuses_an_existing_folder_and_bad_sides_leaving_it_as_it_was(tmp_path):
    out = tmp_path / "digits"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    p = invoke_kdcache("render-digits", str(out), "--per-class", "1")
    assert p.returncode != 0 and p.stderr.count("\n") == 1
    assert f"Error: {out} exists; give --overwrite to replace it, or another folder" in p.stderr
    assert [f.name for f in out.iterdir()] == ["mine.txt"]
    p = invoke_kdcache("render-digits", str(tmp_path / "x"), "--min-side", "60", "--max-side", "50")
    assert p.returncode != 0 and "Error: --min-side 60 is above --max-side 50" in p.stderr
    p = invoke_kdcache("render-digits", str(out), "--per-class", "10000", "--split", "test", "--overwrite")
    assert p.returncode != 0 and "MNIST test has only" in p.stderr
    assert [f.name for f in out.iterdir()] == ["mine.txt"]
    assert not [f for f in Path(tmp_path).iterdir() if f.name.startswith(".")]  # no temporary folder left
    p = invoke_kdcache("render-digits", str(out), "--per-class", "1", "--overwrite")
    assert p.returncode == 0 and sorted(f.name for f in out.iterdir()) == [str(d) for d in range(10)]
