"""``kdcache bench --only vision``: a ResNet-50-class timm teacher over a folder of real image files of
varied sizes (MNIST digits rendered as PNG/JPEG, :func:`kdcache.vision.synth.render_digits`).

What it measures, each side by side in one run:

- decode + resize alone (images/s), the evaluation view and cut views: the input pipeline's limit;
- ``dump-logits`` against decode + bare teacher inference over the same images (plain, and V views);
- cached distillation (one dump of V resized-crop views + K students from the store) against online
  distillation as other libraries do it (each student its own run, the teacher on every batch of the
  same views), and against kdcache's own online run (K students stacked on one teacher pass);
- training from the store against training from the same store held in RAM (fsspec ``memory://``);
- what one image costs in each part (decode, view cut, teacher forward, student step), which says
  what bounds a figure short of its goal.

The students are MLPs over the image (they stack K to a vmap today); teacher and student FLOPs per image
are counted with ``torch.utils.flop_counter.FlopCounterMode``. Weights are random: the cost is what is
measured. The teacher is a spec of this module (``kdcache.bench.vision:teacher``) so that the dump,
the online runs and the bare loop build the same network.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from kdcache.bench.common import interleave, interleave_all

AUGMENT = "resized-crop:0.35+flip"
NUM_CLASSES = 10


@dataclass(frozen=True)
class VisionProfile:
    per_class: int        # training images rendered per digit
    size: int             # the side the models take
    teacher: str          # timm architecture of the teacher
    student: str          # kdcache student spec (an MLP over the image: it stacks)
    epochs: int           # epochs of each student; the store holds one view per epoch
    ks: tuple[int, ...]   # students per comparison; K = 16 extrapolated from the first two when absent
    reps: int
    batch_size: int = 64
    dump_per_class: int = 0  # images per digit for the dump comparison (0: per_class); its fixed set-up
                             # (list, build, hash and probe the teacher) must be small beside the pass


QUICK = VisionProfile(per_class=4, size=32, teacher="resnet18", student="mlp:64", epochs=1, ks=(1, 4), reps=1)
FULL = VisionProfile(per_class=10, size=32, teacher="resnet50", student="mlp:256", epochs=2, ks=(1, 4, 16), reps=2,
                     dump_per_class=600)
TEACHERS = {"teacher": FULL.teacher, "quick_teacher": QUICK.teacher}


def _timm_teacher(name: str) -> nn.Module:
    from kdcache.vision import require
    timm = require("timm", "kdcache bench --only vision")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).eval()


def teacher() -> nn.Module:
    """The full profile's teacher (``kdcache.bench.vision:teacher``): timm ResNet-50, random weights."""
    return _timm_teacher(TEACHERS["teacher"])


def quick_teacher() -> nn.Module:
    """The quick profile's teacher (``kdcache.bench.vision:quick_teacher``): timm ResNet-18."""
    return _timm_teacher(TEACHERS["quick_teacher"])


def flops_per_image(module: nn.Module, size: int) -> int:
    """Floating-point operations of one forward pass of ``module`` on one ``3 x size x size`` image."""
    from torch.utils.flop_counter import FlopCounterMode
    was = module.training
    module.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(torch.zeros(1, 3, size, size))
    module.train(was)
    return int(counter.get_total_flops())


def render(p: VisionProfile, work: Path, data_root: str | None, per_class: int = 0) -> str:
    """The bench's image folder (``per_class`` digits of each class, 40-160 px sides, default the
    profile's), as a full spec."""
    from kdcache.vision.preprocess import Preprocess
    from kdcache.vision.synth import render_digits
    per_class = per_class or p.per_class
    folder = work / f"vision-images-{per_class}"
    if not folder.exists():
        render_digits(folder, per_class, "train", seed=0, data_root=data_root)
    return f"imagefolder:{folder},{Preprocess(size=p.size).spec_keys()}"


def bench_vision(p: VisionProfile, work: Path, device: str, data_root: str | None = None) -> dict[str, Any]:
    """Every figure of the section (see the module's docstring); skipped without the [vision] extra."""
    import importlib.util
    missing = [m for m in ("timm", "torchvision", "PIL") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (pip install 'kdcache[vision]')"}
    from kdcache.datasets import load_dataset
    from kdcache.errors import ConfigError
    from kdcache.specs import load_model
    name = next((k for k, v in TEACHERS.items() if v == p.teacher), None)
    if name is None:
        raise ConfigError(f"vision bench teacher {p.teacher!r}: use one of {', '.join(TEACHERS.values())}")
    teacher_spec = f"kdcache.bench.vision:{name}"
    spec = render(p, work, data_root)
    data = load_dataset(spec, data_root)
    t_mod = load_model(teacher_spec, data.input_shape, data.num_classes).module
    s_mod = load_model(p.student, data.input_shape, data.num_classes).module
    tf, sf = flops_per_image(t_mod, p.size), flops_per_image(s_mod, p.size)
    ctx = _Ctx(p, work, device, spec, teacher_spec, data_root)
    return {
        "images": len(data), "size": p.size, "augment": AUGMENT, "epochs": p.epochs, "views": p.epochs,
        "teacher": f"timm {p.teacher} ({teacher_spec})", "student": p.student,
        "teacher_flops_per_image": tf, "student_flops_per_image": sf, "teacher_over_student_flops": tf / sf,
        "decode": bench_decode(ctx, data),
        "costs": per_image_costs(ctx, data, t_mod, s_mod),
        "dump": bench_vision_dump(ctx),
        "by_K": bench_cached_online(ctx),
        "store_ram": bench_store_ram(ctx),
    }


@dataclass
class _Ctx:
    """What every part of the section shares: the profile, where it writes, the device, the image dataset
    (a spec with every preprocessing key) and the teacher's spec."""

    p: VisionProfile
    work: Path
    device: str
    dataset: str
    teacher: str
    data_root: str | None

    def dump_config(self, out: str, views: bool, dataset: str | None = None) -> Any:
        from kdcache.dump import DumpConfig
        extra = {"augment": AUGMENT, "views": self.p.epochs} if views else {}
        return DumpConfig(teachers=[self.teacher], dataset=dataset or self.dataset, out=str(self.work / out),
                          overwrite=True,
                          device=self.device, progress=False, batch_size=self.p.batch_size,
                          data_root=self.data_root, **extra)

    def train(self, out: str, seeds: list[int], **kw: Any) -> None:
        from kdcache.train import TrainConfig, train_students
        train_students(TrainConfig(dataset=self.dataset, student=self.p.student, out=str(self.work / out),
                                   seeds=seeds, epochs=self.p.epochs, batch_size=self.p.batch_size,
                                   device=self.device, overwrite=True, progress=False, data_root=self.data_root,
                                   **kw))


# -- the input pipeline ---------------------------------------------------------------------------------
def _batches(n: int, b: int) -> list[np.ndarray]:
    return [np.arange(a, min(a + b, n)) for a in range(0, n, b)]


def bench_decode(ctx: _Ctx, data: Any) -> dict[str, Any]:
    """Images/s of decode + resize to the evaluation view, and of decode + cut + resize of views."""
    from kdcache.views import ViewAugmenter, make_views
    ds = data.dataset
    views = make_views(AUGMENT, ctx.p.epochs, 0, data.input_shape, ctx.dataset, None, ds)
    aug = ViewAugmenter(views, "--augment")
    batches = _batches(len(ds), ctx.p.batch_size)

    def evaluation() -> None:
        for b in batches:
            ds.get_batch(b)

    def cut() -> None:
        for b in batches:
            ds.get_views(b, aug, None, np.zeros(len(b), dtype=np.int64))

    te, tv = interleave(evaluation, cut, ctx.p.reps)
    return {"images": len(ds), "decode_resize_images_per_s": len(ds) / te, "decode_cut_resize_images_per_s":
            len(ds) / tv}


def per_image_costs(ctx: _Ctx, data: Any, t_mod: nn.Module, s_mod: nn.Module) -> dict[str, float]:
    """Milliseconds per image of each part, on one batch: decode + resize, decode + view cut + resize,
    the teacher's forward (inference mode), one student's training step (forward, backward, SGD)."""
    from kdcache.distributed import resolve_device
    from kdcache.views import ViewAugmenter, make_views
    dev = resolve_device(ctx.device)
    ds = data.dataset
    b = np.arange(min(ctx.p.batch_size, len(ds)))
    views = ViewAugmenter(make_views(AUGMENT, ctx.p.epochs, 0, data.input_shape, ctx.dataset, None, ds), "--augment")
    x, y = ds.get_batch(b)
    x, y = x.to(dev), y.to(dev)
    t_mod, s_mod = t_mod.to(dev).eval(), s_mod.to(dev).train()
    opt = torch.optim.SGD(s_mod.parameters(), lr=0.01, momentum=0.9)

    def forward() -> None:
        with torch.inference_mode():
            t_mod(x)

    def step() -> None:
        loss = nn.functional.cross_entropy(s_mod(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns: list[Callable[[], Any]] = [lambda: ds.get_batch(b),
                                    lambda: ds.get_views(b, views, None, np.zeros(len(b), dtype=np.int64)),
                                    forward, step]
    times = interleave_all(fns, max(3, ctx.p.reps))
    keys = ("decode_resize_ms", "decode_cut_resize_ms", "teacher_forward_ms", "student_step_ms")
    return {k: 1000 * t / len(b) for k, t in zip(keys, times)}


# -- the dump -----------------------------------------------------------------------------------------------
def bench_vision_dump(ctx: _Ctx) -> list[dict[str, Any]]:
    """``dump-logits`` against decode + bare teacher inference over the same DataLoader batches: the
    plain dump against one bare pass, the dump of V views against V bare passes; and the dump's set-up
    alone (``prepare``: list and fingerprint the folder, build the teacher, hash its weights, probe it),
    a fixed cost that the bare loop, built once, does not pay. Over the profile's ``dump_per_class``
    images, so that the set-up weighs what it would on a real set, not on a hundred images."""
    from kdcache.bench.common import bare_pass
    from kdcache.distributed import resolve_device
    from kdcache.dump import dump_logits, prepare
    rows = []
    images = render(ctx.p, ctx.work, ctx.data_root, ctx.p.dump_per_class)
    n_images = NUM_CLASSES * (ctx.p.dump_per_class or ctx.p.per_class)
    plain = ctx.dump_config("vision-plain.zarr", views=False, dataset=images)
    bare = bare_pass(plain, ctx.device)
    v = ctx.p.epochs

    def bare_views() -> None:
        for _ in range(v):
            bare()

    dev = resolve_device(ctx.device)
    views = ctx.dump_config("vision-views.zarr", True, images)
    for name, cfg, base, passes in (("plain", plain, bare, 1), (f"{v} views ({AUGMENT})", views, bare_views, v)):
        # passes of seconds on a shared machine move by 10 % from one to the next: at least 3 of each
        td, tb, ts = interleave_all([lambda: dump_logits(cfg), base, lambda: prepare(cfg, dev)], max(3, ctx.p.reps))
        rows.append({"dump": name, "images": n_images, "bare_passes": passes, "dump_s": td, "bare_inference_s": tb,
                     "ratio": td / tb, "goal": 1.05, "setup_s": ts, "ratio_after_setup": (td - ts) / tb})
    return rows


# -- cached against online -------------------------------------------------------------------------------
def bench_cached_online(ctx: _Ctx) -> list[dict[str, Any]]:
    """K students for ``epochs`` epochs: one dump of V = epochs views and K stacked students from the store
    (cached), against K online runs with the same views, each its own (online), and against one online
    run of the K students stacked on one teacher pass (online_stacked)."""
    from kdcache.dump import dump_logits
    rows = []
    views = ctx.dump_config("vision-kd.zarr", views=True)
    online = {"teachers": [ctx.teacher], "augment": AUGMENT, "views": ctx.p.epochs}
    for k in ctx.p.ks:
        seeds = list(range(k))

        def cached() -> None:
            dump_logits(views)
            ctx.train(f"vc-{k}", seeds, store=views.out)

        def one_by_one() -> None:
            for s in seeds:
                ctx.train(f"vo-{k}-{s}", [s], **online)

        def stacked_online() -> None:
            ctx.train(f"vs-{k}", seeds, **online)

        # K = 1 warms everything up (imports, the images in the page cache); larger K run long enough once
        tc, to, ts = interleave_all([cached, one_by_one, stacked_online], ctx.p.reps if k == 1 else 1, warmup=k == 1)
        rows.append({"K": k, "cached_s": tc, "online_s": to, "ratio": tc / to, "online_stacked_s": ts,
                     "ratio_to_stacked": tc / ts, "goal": {1: None, 4: 0.5, 16: 0.2}.get(k)})
    if 16 not in ctx.p.ks:
        (k1, c1, o1, s1), (k2, c2, o2, s2) = [(r["K"], r["cached_s"], r["online_s"], r["online_stacked_s"])
                                              for r in rows[:2]]
        def at16(a: float, b: float) -> float:  # the cost per added student, never below zero (noise)
            return b + max(0.0, b - a) * (16 - k2) / (k2 - k1)
        c16, o16, s16 = at16(c1, c2), at16(o1, o2), at16(s1, s2)
        rows.append({"K": 16, "cached_s": c16, "online_s": o16, "ratio": c16 / o16, "online_stacked_s": s16,
                     "ratio_to_stacked": c16 / s16, "goal": 0.2, "extrapolated": True})
    return rows


# -- store against RAM ---------------------------------------------------------------------------------------
def bench_store_ram(ctx: _Ctx) -> dict[str, Any]:
    """K = 4 students from the views store on disk against the same students from the same store copied
    to fsspec's in-process ``memory://`` filesystem: the logits in RAM, every other step the same."""
    from kdcache.convert import convert_store
    from kdcache.dump import dump_logits
    disk = ctx.dump_config("vision-ram.zarr", views=True)
    dump_logits(disk)
    ram = f"memory://kdcache-bench-{time.monotonic_ns()}/views.zarr"
    convert_store(disk.out, ram).close()
    seeds = list(range(4))
    td, tr = interleave(lambda: ctx.train("sr-disk", seeds, store=disk.out),
                        lambda: ctx.train("sr-ram", seeds, store=ram), ctx.p.reps)
    _drop_memory(ram)
    return {"K": 4, "store": "zarr on local disk", "ram": "the same store at memory://", "store_s": td, "ram_s": tr,
            "ratio": td / tr, "goal": 1.05}


def _drop_memory(url: str) -> None:
    import fsspec
    fs = fsspec.filesystem("memory")
    root = url.split("://", 1)[1].split("/", 1)[0]
    if fs.exists(root):
        fs.rm(root, recursive=True)


def show(r: dict[str, Any], echo: Callable[[str], None], table: Callable[..., str]) -> None:
    """Print the section's figures as tables (``table`` is the runner's)."""
    echo(f"vision: {r['images']} image files of varied sizes (rendered MNIST digits), size {r['size']}; teacher "
         f"{r['teacher']}: {r['teacher_flops_per_image'] / 1e6:,.1f} MFLOP per image; student {r['student']}: "
         f"{r['student_flops_per_image'] / 1e6:,.2f} MFLOP per image ({r['teacher_over_student_flops']:,.0f}x)")
    echo(table("  decode + resize alone: the input pipeline's limit", [r["decode"]],
               ["images", "decode_resize_images_per_s", "decode_cut_resize_images_per_s"]))
    echo(table("  what one image costs (ms), on one batch", [r["costs"]], list(r["costs"])))
    echo(table("  dump-logits against decode + bare teacher inference over the same images (goal <= 1.05)",
               r["dump"], ["dump", "images", "bare_passes", "dump_s", "bare_inference_s", "ratio", "goal", "setup_s",
                           "ratio_after_setup"]))
    echo(table(f"  cached (one dump of {r['views']} views + K students from the store) against online "
               f"({AUGMENT}, {r['epochs']} epochs; online: one run per student, online_stacked: one run of K "
               f"stacked students)", r["by_K"],
               ["K", "cached_s", "online_s", "ratio", "goal", "online_stacked_s", "ratio_to_stacked", "extrapolated"]))
    echo(table("  training from the store against training from the same logits in RAM (goal <= 1.05)",
               [r["store_ram"]], ["K", "store_s", "ram_s", "ratio", "goal"]))
