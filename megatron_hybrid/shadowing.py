"""Keep the repository's `kernels/` and `checkpointing/` folders from shadowing installed packages.

Both folders install as `megatron_hybrid.kernels` and `megatron_hybrid.checkpointing`. Python
started in the repository root (`python -m pytest`, `python -c ...`, a notebook) puts that root
first on `sys.path`, where the two folders look like top-level packages `kernels` and
`checkpointing`; they would then be imported in place of PyPI packages of those names
(transformers imports `kernels`). So each folder's `__init__.py` first asks `step_aside`: reached
under its top-level name, it loads the installed package of that name in its own place, or, with
none installed, becomes what a folder without `__init__.py` would be (an empty namespace
package, which is how importers such as transformers recognise "not really installed").
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def step_aside(name: str, init_file: str) -> None:
    """Replace `sys.modules[name]` (the folder of `init_file`, imported as top-level `name`) by
    the package `name` found on `sys.path` without this repository's root."""
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    saved_path = sys.path[:]
    sys.path[:] = [entry for entry in saved_path if os.path.realpath(entry or os.getcwd()) != root]
    try:
        spec = _find_spec(name)
    finally:
        sys.path[:] = saved_path
    if spec is None:  # nothing installed: what a plain folder on sys.path would give
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = []
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import statement returns what sys.modules holds
    if spec.loader is not None:
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise


def _find_spec(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec the import system would find for top-level `name` on the current sys.path."""
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is not None and (spec := find_spec(name, None)) is not None:
            return spec
    return None
