"""The packages depend on each other in one direction only, read from the source (ast), so an
import added anywhere (module level or inside a function) that crosses a seam the wrong way
fails here, naming the file and the import:

- kernels/ (eager references, Triton kernels, the registry) imports nothing of the model side:
  the layers call kernels through the bound registry, never the other way round;
- the model side (megatron_hybrid/ except training/, which drives everything) imports nothing
  of checkpointing/ or training/: checkpointing reads the model, not the reverse.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Folder -> the import name it installs as (setup.py's package_dir).
PACKAGE_ROOTS = {
    "megatron_hybrid": "megatron_hybrid",
    "kernels": "megatron_hybrid.kernels",
    "checkpointing": "megatron_hybrid.checkpointing",
}
# What kernels/ may import of this project: itself, and the shadowing guard of its __init__.py.
KERNELS_MAY_IMPORT = ("megatron_hybrid.kernels", "megatron_hybrid.shadowing")
MODEL_SIDE_MUST_NOT_IMPORT = ("megatron_hybrid.checkpointing", "megatron_hybrid.training")


def module_files(folder: str) -> dict[str, Path]:
    """{dotted module name: file} of every module under the repository folder `folder`."""
    root = REPO / folder
    top = folder.split("/")[0]
    base = PACKAGE_ROOTS[top].split(".") + list(Path(folder).parts[1:])
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(base + parts)] = path
    return out


def imported_names(module: str, path: Path) -> set[str]:
    """Every name `path` imports, as `package.module` or `package.module.attribute` (an
    attribute of a from-import may be a sub-module), relative imports resolved."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def under(name: str, prefixes, separator: str = ".") -> bool:
    """Whether `name` is one of `prefixes` or inside one."""
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == prefix or name.startswith(prefix + separator) for prefix in prefixes)


def crossings(folder: str, bad, skip=()) -> list[str]:
    """ "file: import" for every import that `bad(name)` rejects in the modules under `folder`,
    but those in files or folders (repository paths) listed in `skip`."""
    found = []
    for module, path in module_files(folder).items():
        relative = path.relative_to(REPO).as_posix()
        if not under(relative, skip, "/"):
            found += [
                f"{relative}: {name}" for name in sorted(imported_names(module, path)) if bad(name)
            ]
    return found


def test_the_import_reader_sees_imports_of_every_kind():
    # A reader that missed imports would make every rule below pass vacuously.
    names = imported_names(
        "megatron_hybrid.layers.norm", REPO / "megatron_hybrid" / "layers" / "norm.py"
    )
    assert "megatron_hybrid.kernels.registry.BoundKernels" in names
    names = imported_names("megatron_hybrid.kernels", REPO / "kernels" / "__init__.py")
    assert "megatron_hybrid.shadowing.step_aside" in names  # inside an if, not at the top
    assert "megatron_hybrid.kernels.cli.add_kernel_args" in names


def test_kernels_import_nothing_of_the_model_side():
    assert module_files("kernels"), "no modules found under kernels/"
    found = crossings(
        "kernels",
        lambda name: name.startswith("megatron_hybrid") and not under(name, KERNELS_MAY_IMPORT),
    )
    assert found == [], (
        "kernels/ may import only " + ", ".join(KERNELS_MAY_IMPORT) + " of this project (the "
        "layers call kernels through the bound registry; eager math a kernel needs lives in "
        "its op's eager.py):\n  " + "\n  ".join(found)
    )


def test_layers_import_no_checkpointing():
    found = crossings(
        "megatron_hybrid/layers", lambda name: under(name, "megatron_hybrid.checkpointing")
    )
    assert found == [], "\n  ".join(["layers import checkpointing:", *found])


def test_the_model_side_imports_no_checkpointing_or_training():
    found = crossings(
        "megatron_hybrid",
        lambda name: under(name, MODEL_SIDE_MUST_NOT_IMPORT),
        skip=("megatron_hybrid/training",),
    )
    assert found == [], (
        "the model side (megatron_hybrid/ but training/) must not import checkpointing/ or "
        "training/ (they build on it):\n  " + "\n  ".join(found)
    )


def test_init_imports_no_checkpointing():
    path = REPO / "megatron_hybrid" / "init.py"
    found = sorted(
        name
        for name in imported_names("megatron_hybrid.init", path)
        if under(name, MODEL_SIDE_MUST_NOT_IMPORT)
    )
    assert found == [], f"megatron_hybrid/init.py imports {found}"
