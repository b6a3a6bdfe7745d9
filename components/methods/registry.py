"""The method names and their knobs, read without importing the methods (no torch).

A knob is a keyword parameter of a method's constructor chain (beyond ``extractor``, ``image_size`` and
``progress``). They are read from the modules' source with :mod:`ast`, following the base classes within
this package, so that params.yaml can be validated by stages that never build a model.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

#: method name → (module in components/methods, class)
REGISTRY: dict[str, tuple[str, str]] = {
    "dn2": ("knn", "DN2"),
    "spade": ("knn", "SPADE"),
    "patchcore": ("knn", "PatchCore"),
    "gaussian": ("gaussian", "GaussianAD"),
    "padim": ("gaussian", "PaDiM"),
    "panda": ("panda", "PANDA"),
    "panda_oe": ("panda", "PANDAOE"),
    "gaussian_ft": ("gaussian_ft", "GaussianFT"),
    "topology": ("topology", "Topology"),
    "recontrast": ("recontrast", "ReContrast"),
}
METHOD_NAMES: tuple[str, ...] = tuple(REGISTRY)


@functools.cache
def _module(name: str) -> tuple[dict[str, ast.ClassDef], dict[str, str]]:
    """The classes of ``components/methods/<name>.py`` and the names it imports from sibling modules."""
    tree = ast.parse(Path(__file__).with_name(f"{name}.py").read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    imported = {
        alias.asname or alias.name: node.module.rsplit(".", 1)[-1]
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("components.methods.")
        for alias in node.names
    }
    return classes, imported


def _init_keywords(cls: ast.ClassDef) -> set[str]:
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == "__init__":
            args = item.args
            positional = args.posonlyargs + args.args
            defaulted = positional[len(positional) - len(args.defaults) :] if args.defaults else []
            return {a.arg for a in defaulted} | {a.arg for a in args.kwonlyargs}
    return set()


@functools.cache
def method_knobs(name: str) -> frozenset[str]:
    """Keyword parameters a method's constructor chain accepts (beyond extractor and image size)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    knobs: set[str] = set()
    todo, seen = [REGISTRY[name]], set()
    while todo:
        module, cls = todo.pop()
        if (module, cls) in seen:
            continue
        seen.add((module, cls))
        classes, imported = _module(module)
        node = classes[cls]
        knobs |= _init_keywords(node)
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                todo.append((module, base.id))
            elif isinstance(base, ast.Name) and base.id in imported:
                todo.append((imported[base.id], base.id))
    return frozenset(knobs - {"progress"})
