"""The YAML training recipes that ship with fastssl, found by name.

In a source checkout they are ``configs/<group>/<name>.yaml``; an installed wheel carries
the same files as package data (``fastssl/configs/``), so ``fastssl-train --config simclr_rn50``
works from any directory. A recipe is named by its stem (``simclr_rn50``, ``simclr``), by
group and stem (``imagenet/simclr_rn50``, ``demo/simclr``), or by its checkout path
(``configs/demo/simclr.yaml``), with or without ``.yaml``. A recipe may build on a base in its
folder (``defaults: [_base]``); the base resolves relative to the recipe, in a checkout and in a
wheel alike.
"""
from __future__ import annotations

from pathlib import Path

from fastssl.registry import closest


class RecipeNotFound(LookupError):
    """No packaged recipe has this name; the message names the closest ones."""


def recipes_dir() -> Path | None:
    """The folder holding the packaged recipes: ``fastssl/configs`` (wheel) or ``<checkout>/configs``."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "configs"):
        if d.is_dir() and any(d.glob("*/*.yaml")):
            return d
    return None


def list_recipes() -> dict[str, Path]:
    """``{"demo/simclr": Path(...), "imagenet/simclr_rn50": ...}``, sorted by name.

    Files whose name starts with ``_`` (``imagenet/_base.yaml``) are bases other recipes build on
    (``defaults: [_base]``, :func:`fastssl.config.read_recipe`), not recipes to run: not listed, not
    resolved by name.
    """
    root = recipes_dir()
    if root is None:
        return {}
    return {f"{p.parent.name}/{p.stem}": p for p in sorted(root.glob("*/*.yaml")) if not p.stem.startswith("_")}


def describe(path: Path) -> str:
    """The recipe's first header comment line (what it trains, on what)."""
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line.startswith("#") and line.lstrip("# ").strip():
                    return line.lstrip("# ").strip()
                if line and not line.startswith("#"):
                    break
    except OSError:
        pass
    return ""


def _key(name: str) -> str:
    key = str(name).strip().replace("\\", "/")
    for suffix in (".yaml", ".yml"):
        if key.endswith(suffix):
            key = key[: -len(suffix)]
    while key.startswith("./"):
        key = key[2:]
    if key.startswith("configs/"):
        key = key[len("configs/"):]
    return key


def resolve_recipe(name: str) -> Path:
    """The packaged recipe ``name`` names (see the module docstring); raises :class:`RecipeNotFound`."""
    recipes = list_recipes()
    key = _key(name)
    if key in recipes:
        return recipes[key]
    by_stem: dict[str, list[str]] = {}
    for full in recipes:
        by_stem.setdefault(full.split("/", 1)[1], []).append(full)
    hits = by_stem.get(key, [])
    if len(hits) == 1:
        return recipes[hits[0]]
    if len(hits) > 1:
        raise RecipeNotFound(f"recipe {name!r} is ambiguous: name one of {', '.join(hits)}")
    if not recipes:
        raise RecipeNotFound(f"{name!r} is not a file, and this installation ships no recipes")
    hint = closest(key, list(recipes) + list(by_stem))
    if not hint.startswith("did you mean"):
        hint = "the recipes are " + ", ".join(recipes)
    raise RecipeNotFound(f"{name!r} is neither a file nor a packaged recipe: {hint} "
                         f"(`fastssl-train --list-configs` lists the recipes)")
