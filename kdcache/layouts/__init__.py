"""Store layouts: how each row's teacher logits are kept on disk, and everything that depends on it.

A layout is a small frozen class holding its parameters (the manifest's ``layout_params``). It says
which per-row arrays a store of it has (shapes, dtypes, fill values, dimension names), validates its
parameters, encodes a batch of raw teacher logits into those arrays, and turns stored rows back into
training targets, top-1 predictions, the statistics ``kdcache inspect`` shows and the values that
``kdcache verify --teacher`` compares with a live teacher. Nothing outside this package tests a
layout's name: the rest of kdcache asks the layout.

Adding a layout is one module with a :class:`Layout` subclass passed to :func:`register`, a section
in FORMAT.md and a case in the conformance tests (``tests/test_layouts.py``).
"""
# isort: off
from kdcache.layouts.base import (  # noqa: F401
    LAYOUTS, Layout, all_array_dims, encode_rows, layout_class, layout_for, layout_of, load_plugins, names, register)
# the built-in layouts register themselves, in the order the CLI lists them
from kdcache.layouts import dense  # noqa: E402,F401
from kdcache.layouts import topk  # noqa: E402,F401
from kdcache.layouts import sampled  # noqa: E402,F401
# isort: on
