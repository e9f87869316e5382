"""Image classifiers from timm, torchvision and transformers as kdcache model specs.

- ``timm:NAME[,checkpoint=PATH][,key=value...]``: ``timm.create_model(NAME, pretrained=False,
  num_classes=<the dataset's unless num_classes= is given>, **kwargs)``; nothing is downloaded.
- ``torchvision:NAME[,checkpoint=PATH][,key=value...]``: ``torchvision.models.get_model``, same rules.
- ``hf:PATH`` where PATH holds a transformers image classifier (``AutoModelForImageClassification``:
  ViT, ResNet, ConvNeXt, ...); ``num_classes=N`` gives it a fresh head of N classes.

Values of ``key=value`` are read as int, float, bool or None where they look like one (``drop_rate=0.1``,
``pretrained=false``). ``checkpoint=`` loads weights from safetensors, or from a ``.pth``/``.bin`` through
``torch.load(weights_only=True)``: the library's own plain state dict (a timm or torchvision
``state_dict()``, or kdcache's ``model.safetensors``). Every module takes a float image batch
``[B, 3, H, W]`` and returns ``[B, classes]`` logits.

A student's ``model.safetensors`` holds the library's own state-dict keys (:func:`library_module`), so
``timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` or
``load_state_dict`` read it; :func:`save_library_files` adds what plain timm / transformers need to load
the run directory itself.
"""
from __future__ import annotations

import difflib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdcache.errors import SpecError

VISION_EXTRA = "pip install 'kdcache[vision]'"
FAMILIES = ("timm", "torchvision")
# PIL's resampling filters by number, as transformers' image processors store them
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _require(name: str, spec: str) -> Any:
    try:
        if name == "timm":
            import timm
            return timm
        import torchvision
        return torchvision
    except ImportError:
        raise SpecError(f"model spec {spec!r} needs {name}: {VISION_EXTRA}") from None


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.1"`` -> 0.1, ``"true"`` -> True, ``"none"`` -> None; anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"timm:resnet18,drop_rate=0.1"`` -> ``("timm", "resnet18", {"drop_rate": "0.1"})``."""
    family, _, rest = spec.partition(":")
    name, *parts = rest.split(",")
    kv: dict[str, str] = {}
    for part in parts:
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise SpecError(f"model spec {spec!r}: cannot read {part!r}; options are key=value, "
                            f"e.g. {family}:resnet18,drop_rate=0.1")
        kv[k.strip()] = v.strip()
    if not name.strip():
        raise SpecError(f"model spec {spec!r}: give the model's name, e.g. {family}:resnet18")
    return family, name.strip(), kv


def is_vision_spec(spec: str) -> bool:
    return spec.partition(":")[0] in FAMILIES


def arch_of(spec: str) -> str:
    """The architecture a kdcache checkpoint records: the spec without ``checkpoint=`` (the weights are in
    the checkpoint itself, so it reloads when that file is gone)."""
    if not is_vision_spec(spec):
        return spec
    family, name, kv = parse_spec(spec)
    kv.pop("checkpoint", None)
    return ",".join([f"{family}:{name}", *(f"{k}={v}" for k, v in kv.items())])


def build(spec: str, num_classes: int | None, dropout: float = 0.0) -> nn.Module:
    """The module a ``timm:`` or ``torchvision:`` spec names, fresh (seeded by the caller) or with the
    weights of ``checkpoint=``; its classes are ``num_classes=`` or else the dataset's (``num_classes``).
    ``dropout`` (kdcache's own models' option) is refused: the spec's own options set a library model's."""
    family, name, kv = parse_spec(spec)
    if dropout:
        option = "drop_rate" if family == "timm" else "dropout"  # torchvision's ViT, EfficientNet, ...
        raise SpecError(f"{{param:dropout}} is for kdcache's mlp: and lstm: models; give the {family} model its own "
                        f"option, e.g. {family}:{name},{option}={dropout:g}")
    lib = _require(family, spec)
    checkpoint = kv.pop("checkpoint", None)
    kwargs = {k: parse_value(v) for k, v in kv.items()}
    given = kwargs.pop("num_classes", None)
    if given is not None and (not isinstance(given, int) or given < 1):
        raise SpecError(f"model spec {spec!r}: num_classes must be a positive integer")
    if kwargs.get("pretrained"):
        raise SpecError(f"model spec {spec!r}: kdcache downloads no weights; give checkpoint=PATH (safetensors, or "
                        f".pth/.bin of a plain state dict)")
    kwargs.pop("pretrained", None)
    if given is not None and num_classes is not None and given != num_classes:
        raise SpecError(f"model spec {spec!r} has {given} classes but the dataset has {num_classes}; drop "
                        f"num_classes= (a head of {num_classes} classes), or use a dataset of {given} classes")
    classes = given if given is not None else num_classes
    names = _names(lib, family)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
        hint = f"; closest: {', '.join(close)}" if close else f"; list them with {family}.list_models()"
        raise SpecError(f"model spec {spec!r}: {family} has no model {name!r}{hint}")
    state = read_state_dict(checkpoint, spec) if checkpoint is not None else None
    module = _create(lib, family, name, spec, kwargs, classes)
    if state is not None:
        theirs = _head_classes(module, state)
        if classes is None and theirs is not None:  # no number of classes given: the checkpoint's head
            classes = theirs
            module = _create(lib, family, name, spec, kwargs, classes)
        load_weights(module, state, f"{spec!r}: checkpoint {checkpoint}", classes, theirs)
    return module


def _create(lib: Any, family: str, name: str, spec: str, kwargs: dict[str, Any], classes: int | None) -> nn.Module:
    args = {**kwargs, **({"num_classes": classes} if classes is not None else {})}
    try:
        if family == "timm":
            return lib.create_model(name, pretrained=False, **args)
        return lib.models.get_model(name, weights=None, **args)
    except TypeError as e:
        raise SpecError(f"model spec {spec!r}: {family} model {name} does not take these options "
                        f"({str(e).splitlines()[0]})") from None


def _head_classes(module: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of ``state``'s head where only the head's shape differs from ``module``'s
    (the tensors whose shapes differ do so in their first dimension only, all to one size), else None."""
    own = module.state_dict()
    resized = [k for k in state if k in own and state[k].shape != own[k].shape]
    if not resized or any(state[k].shape[1:] != own[k].shape[1:] for k in resized):
        return None
    sizes = {state[k].shape[0] for k in resized}
    return sizes.pop() if len(sizes) == 1 else None


def _names(lib: Any, family: str) -> list[str]:
    return list(lib.list_models()) if family == "timm" else list(lib.models.list_models())


def read_state_dict(path: str, spec: str) -> dict[str, torch.Tensor]:
    """A plain state dict from safetensors or, without unpickling anything but tensors, a torch file."""
    p = Path(path)
    if p.is_dir() and (p / "model.safetensors").exists():
        p = p / "model.safetensors"
    if not p.is_file():
        raise SpecError(f"model spec {spec!r}: checkpoint {path} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpecError(f"model spec {spec!r}: checkpoint {path} cannot be read safely ({str(e).splitlines()[0]}); "
                        f"give a safetensors file or a torch file of a plain state dict") from None
    for key in ("state_dict", "model", "state_dict_ema"):  # training scripts' wrappers of the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpecError(f"model spec {spec!r}: checkpoint {path} is not a state dict (names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(module: nn.Module, state: dict[str, torch.Tensor], what: str, classes: int | None,
                 theirs: int | None) -> None:
    """Load ``state`` into ``module``; a head of another number of classes (``theirs``) is named in one line.
    ``what`` names the spec and the file for the messages."""
    if theirs is not None and classes is not None and theirs != classes:
        raise SpecError(f"model spec {what} has a head of {theirs} classes but the model is built with "
                        f"{classes} (the dataset's or num_classes=); give a checkpoint trained on these {classes} "
                        f"classes, or a dataset of {theirs} classes")
    own = module.state_dict()
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        missing = [k for k in own if k not in state][:3]
        unexpected = [k for k in state if k not in own][:3]
        resized = [k for k in state if k in own and state[k].shape != own[k].shape][:3]
        detail = (f"missing {missing}, unexpected {unexpected}" if missing or unexpected
                  else f"shapes differ at {resized}")
        if not (missing or unexpected or resized):
            detail = str(e).strip().splitlines()[-1].strip()[:200]
        raise SpecError(f"model spec {what} does not fit this model ({detail}); give the model name and options "
                        f"it was trained with") from None


class HFImageClassifier(nn.Module):
    """A transformers image classifier as kdcache sees one: a float image batch ``[B, 3, H, W]`` in
    (``pixel_values``), ``[B, classes]`` float32 logits out. ``source`` is the directory it came from
    (its ``preprocessor_config.json`` is the model's preprocessing)."""

    def __init__(self, model: nn.Module, source: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits.float()


def is_image_classifier(config: Any) -> bool:
    """Whether a transformers config names an image classifier: its ``architectures`` (what
    ``save_pretrained`` of a model records) end in ``ForImageClassification``."""
    return any(a.endswith("ForImageClassification") for a in getattr(config, "architectures", None) or [])


def build_hf_image(transformers: Any, spec: str, path: str, kv: dict[str, str], config: Any,
                   num_classes: int | None) -> nn.Module:
    """``hf:PATH[,num_classes=N]`` for an image classifier saved with ``save_pretrained``."""
    options = dict(kv)
    given = options.pop("num_classes", None)
    if options:
        raise SpecError(f"model spec {spec!r}: an image classifier takes num_classes=N (a fresh head), "
                        f"not {sorted(options)}")
    try:
        classes = int(given) if given is not None else None
    except ValueError:
        raise SpecError(f"model spec {spec!r}: num_classes must be a positive integer") from None
    if classes is not None and classes < 1:
        raise SpecError(f"model spec {spec!r}: num_classes must be a positive integer")
    saved = int(config.num_labels)
    if classes is not None and num_classes is not None and classes != num_classes:
        raise SpecError(f"model spec {spec!r} has {classes} classes but the dataset has {num_classes}; give "
                        f"num_classes={num_classes} or drop it")
    if classes is None and num_classes is not None and saved != num_classes:
        raise SpecError(f"model spec {spec!r}: {path} classifies {saved} classes but the dataset has {num_classes}; "
                        f"give hf:{path},num_classes={num_classes} (a fresh head of {num_classes} classes) or a model "
                        f"trained on these classes")
    head = {} if classes is None or classes == saved else {"num_labels": classes, "ignore_mismatched_sizes": True}
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32, **head)
    except Exception as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"model spec {spec!r}: cannot be loaded as an image classifier ({text})") from None
    return HFImageClassifier(model, path)


def library_module(module: nn.Module) -> nn.Module:
    """The module whose ``state_dict`` is the library's own: the transformers model inside an
    :class:`HFImageClassifier`, any other module itself (timm and torchvision models are not wrapped)."""
    return module.model if isinstance(module, HFImageClassifier) else module


def load_library_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    library_module(module).load_state_dict(state)


def save_library_files(module: nn.Module, out: Path, arch: str, preprocess: dict[str, Any] | None = None
                       ) -> dict[str, Any]:
    """What plain timm / transformers need beside ``out/model.safetensors`` (written by kdcache with the
    library's keys): a transformers classifier is saved with ``save_pretrained`` to ``out/hf``; a timm
    model returns the keys of timm's hub ``config.json`` (``architecture``, ``num_classes``,
    ``pretrained_cfg``, ``model_args``) for the run's ``config.json``, so that
    ``timm.create_model("local-dir:" + out)`` loads the run directory. Others: nothing.

    A transformers classifier's ``preprocessor_config.json`` (where its source directory has one) is
    copied to ``out/hf`` too. A timm model's ``pretrained_cfg`` says the ``preprocess`` it was trained
    with (input size, interpolation, mean, std, crop_pct), not its architecture's defaults."""
    if isinstance(module, HFImageClassifier):
        module.model.save_pretrained(out / "hf", safe_serialization=True)
        processor = Path(module.source or "") / "preprocessor_config.json"
        if module.source and processor.is_file():  # the image processor it came with, for AutoImageProcessor
            shutil.copyfile(processor, out / "hf" / processor.name)
        return {}
    if not arch.startswith("timm:") or not hasattr(module, "pretrained_cfg"):
        return {}
    from timm.models._hub import save_config_for_hf
    _, _, kv = parse_spec(arch)
    args = {k: parse_value(v) for k, v in kv.items() if k not in ("checkpoint", "num_classes")}
    with tempfile.TemporaryDirectory() as d:
        save_config_for_hf(module, str(Path(d) / "config.json"), model_args=args or None)
        hub = json.loads((Path(d) / "config.json").read_text())
    if preprocess:
        s = int(preprocess["size"])
        hub["pretrained_cfg"] = {**hub.get("pretrained_cfg", {}), "input_size": [3, s, s],
                                 "interpolation": preprocess["interpolation"], "mean": list(preprocess["mean"]),
                                 "std": list(preprocess["std"]), "crop_pct": preprocess["crop_pct"]}
    return hub


def model_preprocess(module_or_spec: nn.Module | str) -> dict[str, Any] | None:
    """The model's own preprocessing, or None when it states none (torchvision models, kdcache's own):
    ``{"size": int, "mean": [3 floats], "std": [3 floats], "interpolation": "bilinear"|"bicubic"|...,
    "crop_pct": float}``. From timm's ``pretrained_cfg`` (``input_size``, ``interpolation``, ``mean``,
    ``std``, ``crop_pct``) or an hf image model's ``preprocessor_config.json``. Resize to
    ``size / crop_pct``, centre crop ``size``, then ``(x - mean) / std`` on pixels in [0, 1]."""
    if isinstance(module_or_spec, str):
        return _spec_preprocess(module_or_spec)
    if isinstance(module_or_spec, HFImageClassifier):
        return _hf_preprocess(module_or_spec.source) if module_or_spec.source else None
    cfg = getattr(module_or_spec, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    from timm.data import resolve_model_data_config
    from timm.models._hub import get_model_input_config
    d = resolve_model_data_config(module_or_spec)
    # the size the model is built for (img_size=64 on a ViT), as timm's own export records it
    size = (get_model_input_config(module_or_spec).get("input_size") or d["input_size"])[-1]
    return {"size": int(size), "mean": [float(v) for v in d["mean"]],
            "std": [float(v) for v in d["std"]], "interpolation": str(d["interpolation"]),
            "crop_pct": float(d["crop_pct"])}


def _spec_preprocess(spec: str) -> dict[str, Any] | None:
    if spec.startswith("timm:"):
        with torch.device("meta"):  # the pretrained_cfg the options give, without initialising weights
            module = build(arch_of(spec), None)
        return model_preprocess(module)
    if spec.startswith("hf:"):
        head = spec[3:].split(",")[0]
        return _hf_preprocess(head) if (Path(head) / "preprocessor_config.json").exists() else None
    path = Path(spec)
    if path.is_dir() and (path / "model.safetensors").exists():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors" and path.exists():  # a kdcache checkpoint: its architecture's
        from kdcache.checkpoint_header import read_checkpoint_meta
        arch = read_checkpoint_meta(path)["arch"]
        hf_dir = path.parent / "hf" / "preprocessor_config.json"
        if arch.startswith("hf:") and hf_dir.exists():
            return _hf_preprocess(str(hf_dir.parent))
        return _spec_preprocess(arch)
    return None


def _hf_preprocess(path: str) -> dict[str, Any] | None:
    """``preprocessor_config.json``: ``size`` (``{"height", "width"}`` or ``{"shortest_edge"}``), ``resample``,
    ``image_mean``, ``image_std``, and ``crop_pct`` or ``crop_size`` where it centre-crops."""
    f = Path(path) / "preprocessor_config.json"
    if not f.exists():
        return None
    p = json.loads(f.read_text())
    size = _edge(p.get("size"), 224)
    crop_pct = float(p.get("crop_pct") or 1.0)
    if p.get("do_center_crop") and p.get("crop_size") and not p.get("crop_pct"):
        crop = _edge(p["crop_size"], size)
        size, crop_pct = crop, crop / size
    normalise = p.get("do_normalize", True)
    mean = [float(v) for v in p.get("image_mean", [0.5] * 3)] if normalise else [0.0] * 3
    std = [float(v) for v in p.get("image_std", [0.5] * 3)] if normalise else [1.0] * 3
    return {"size": size, "mean": mean, "std": std, "interpolation": RESAMPLE.get(p.get("resample", 2), "bilinear"),
            "crop_pct": crop_pct}


def _edge(size: Any, default: int) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in size:
                return int(size[key])
    return default
