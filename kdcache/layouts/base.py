"""The layout base class and the registry of layouts (see :mod:`kdcache.layouts`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import numpy as np

from kdcache.errors import KdcacheError, SpecError, StoreError

ArraySpec = tuple[tuple[int, ...], str, Any]  # trailing shape (after the row axis), dtype, fill value


@dataclass(frozen=True, kw_only=True)
class Layout:
    """One layout's parameters and behaviour. Subclasses set the class attributes and override the
    methods that differ; instances are built from a manifest by :func:`layout_of`."""

    name: ClassVar[str]
    help: ClassVar[str]  # one line for ``dump-logits --help``
    # the per-row arrays, in the order the chunk digest hashes them -> their dimension names after the row
    array_dims: ClassVar[dict[str, tuple[str, ...]]]
    # what a dump or a conversion takes for this layout (``DumpConfig`` field names), beyond ``seed``
    options: ClassVar[tuple[str, ...]] = ()
    # every logit is kept: ensemble reductions and logit matching work on it, and it converts to other layouts
    keeps_every_logit: ClassVar[bool] = False
    # encode() can run where the teacher ran (on its GPU): only the encoded arrays go to the host. The dump
    # then encodes a batch at a time, so such a layout must not be seeded by chunk.
    encodes_on_device: ClassVar[bool] = False
    # encode() draws random numbers seeded by chunk: it must be called one chunk at a time
    seeded_by_chunk: ClassVar[bool] = False
    num_classes: int = 0

    # ---- the manifest's side ----
    @classmethod
    def from_params(cls, params: dict[str, Any], num_classes: int) -> "Layout":
        """The layout of a manifest's ``layout_params``, validated (StoreError on a bad one)."""
        want = set(cls.param_names())
        if set(params) != want:
            raise StoreError(f"layout {cls.name!r} takes parameters {sorted(want) or 'none'}, got {sorted(params)}")
        return cls(num_classes=num_classes, **params)

    @classmethod
    def param_names(cls) -> tuple[str, ...]:
        from dataclasses import fields
        return tuple(f.name for f in fields(cls) if f.name != "num_classes")

    @classmethod
    def from_options(cls, num_classes: int, options: dict[str, Any]) -> "Layout":
        """The layout a dump asks for, defaults filled in. ``options``: the dump's layout options by name
        (None where not given), ``seed`` always. Options this layout does not take are refused."""
        cls.refuse_others(options)
        return cls(num_classes=num_classes)

    @classmethod
    def refuse_others(cls, options: dict[str, Any]) -> None:
        """Refuse options given (not None) that this layout does not take."""
        given = sorted(k for k, v in options.items() if v is not None and k not in cls.options and k != "seed")
        if given:
            names = ", ".join(f"{{param:{k}}}" for k in given)
            raise SpecError(f"{names} {'applies' if len(given) == 1 else 'apply'} to other layouts, not {cls.name}")

    def params(self) -> dict[str, Any]:
        """The manifest's ``layout_params``."""
        return {k: getattr(self, k) for k in self.param_names()}

    def row_arrays(self, members: int, dtype: str) -> dict[str, ArraySpec]:
        """The per-row arrays, in digest order: name -> (trailing shape, dtype, fill value)."""
        raise NotImplementedError

    # ---- stage one ----
    def encode(self, chunk: int, z: Any) -> dict[str, Any]:
        """Raw logits ``z`` ``[rows, members, classes]`` (a float32 torch tensor; on the teacher's device
        when :attr:`encodes_on_device`) -> the layout's arrays as tensors on the same device. ``chunk``:
        the store chunk of the first row (random draws are seeded by it)."""
        raise NotImplementedError

    # ---- stage two ----
    def targets(self, data: dict[str, np.ndarray], allow_interpolation: bool = False, where: str = "store") -> Any:
        """Stored rows (the layout's arrays) -> what the loss takes: a float32 tensor of raw logits
        ``[rows, members, classes]``, or :class:`kdcache.layouts.sparse.SparseTargets`."""
        raise NotImplementedError

    def check_serves(self, temperatures: Sequence[float], members: Sequence[int] | None,
                     allow_interpolation: bool, num_members: int) -> None:
        """Refuse, before training, settings the stored rows cannot serve exactly."""

    def predicted(self, data: dict[str, np.ndarray], ensemble: str = "mean-prob",
                  members: Sequence[int] | None = None) -> Any:
        """The teacher's (ensemble's) predicted class per row, a tensor ``[rows]``."""
        raise NotImplementedError

    # ---- checks, inspect and verify ----
    def bad_id_rows(self, data: dict[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
        """(array name, a bool per row) for rows holding class ids out of range, or None if no id array."""
        return None

    def top1(self, data: dict[str, np.ndarray]) -> np.ndarray:
        """Each member's predicted class per row ``[rows, members]``."""
        raise NotImplementedError

    def ensemble_top1(self, data: dict[str, np.ndarray]) -> np.ndarray | None:
        """The ensemble's (mean probability at T = 1) prediction per row, or None where the stored rows
        cannot give it exactly (a sparse store of several members)."""
        top = self.top1(data)
        return top[:, 0] if top.shape[1] == 1 else None

    def statistics(self, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Sums over the rows of ``data`` of the per-row statistics ``inspect`` averages: name ->
        a vector, one entry per label of :meth:`statistic_labels`."""
        return {}

    def statistic_labels(self) -> dict[str, list[str]]:
        return {}

    def live_pairs(self, stored: dict[str, np.ndarray], live: np.ndarray) -> list[tuple[Any, ...]]:
        """(array, stored values, the values a live teacher's logits ``live`` give for it, float64, and the
        absolute rounding the layout itself allows beyond the stored dtype's: 0, or an array)."""
        raise NotImplementedError


LAYOUTS: dict[str, type[Layout]] = {}


def register(cls: type[Layout]) -> type[Layout]:
    """Make a layout known to stores, the CLI and every stage (usable as a class decorator)."""
    if cls.name in LAYOUTS and LAYOUTS[cls.name] is not cls:
        raise KdcacheError(f"layout {cls.name!r} is already registered")
    LAYOUTS[cls.name] = cls
    return cls


_PLUGINS_LOADED = False


def load_plugins() -> None:
    """Import, once, the modules named in ``$KDCACHE_LAYOUTS`` (comma-separated), whose layouts register
    themselves: how a layout of your own reaches the ``kdcache`` command and its worker processes.
    Called when a layout name is looked up or listed, once the rest of kdcache is loaded."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    import importlib
    import os
    for name in filter(None, (m.strip() for m in os.environ.get("KDCACHE_LAYOUTS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise SpecError(f"KDCACHE_LAYOUTS names module {name!r}, which cannot be imported ({e}); put it on "
                            f"PYTHONPATH or fix the variable") from None


def names() -> tuple[str, ...]:
    load_plugins()
    return tuple(LAYOUTS)


def layout_class(name: str) -> type[Layout]:
    if name not in LAYOUTS:
        load_plugins()
    if name not in LAYOUTS:
        raise StoreError(f"layout {name!r} is not supported by this kdcache; known: {', '.join(LAYOUTS)} (a layout "
                         f"of your own: name the module that registers it in KDCACHE_LAYOUTS)")
    return LAYOUTS[name]


def layout_of(manifest: Any) -> Layout:
    """The layout of a manifest (or anything with ``layout``, ``layout_params`` and ``num_classes``)."""
    return layout_class(manifest.layout).from_params(dict(manifest.layout_params), manifest.num_classes)


def layout_for(name: str, num_classes: int, **options: Any) -> Layout:
    """The layout a dump or conversion asks for by name and options (SpecError on a bad one)."""
    load_plugins()
    if name not in LAYOUTS:
        raise SpecError(f"layout {name!r} is unknown; use one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name].from_options(num_classes, options)


def encode_rows(layout: Layout, first_chunk: int, z: np.ndarray, chunk_rows: int) -> dict[str, np.ndarray]:
    """The layout's arrays (host numpy) for raw logits ``z`` ``[rows, members, classes]`` of consecutive
    chunks from ``first_chunk``: a layout seeded by chunk encodes one chunk at a time."""
    import torch
    t = torch.from_numpy(np.asarray(z, np.float32))
    if not layout.seeded_by_chunk or len(z) <= chunk_rows:
        return {k: v.cpu().numpy() for k, v in layout.encode(first_chunk, t).items()}
    parts = [layout.encode(first_chunk + i, t[a:a + chunk_rows]) for i, a in enumerate(range(0, len(z), chunk_rows))]
    return {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}


def all_array_dims() -> dict[str, tuple[str, ...]]:
    """Every registered layout's arrays -> dimension names after the row axis."""
    return {a: d for cls in LAYOUTS.values() for a, d in cls.array_dims.items()}
