"""Recipes: per model family, which units are candidates and how (YAML, shipped as package
data in ``models/recipes/`` (installed as ``depthprune.models``) and read with `importlib.resources`, so an installed wheel
has them as the source tree does)."""
from __future__ import annotations

from importlib import resources

from ..errors import UserError


def recipe_names() -> list[str]:
    """The recipes this installation ships."""
    folder = resources.files("depthprune.models").joinpath("recipes")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name: str) -> dict:
    """The recipe ``name`` (e.g. ``llama``, ``yolov5``) as a dict. A missing recipe means a broken
    installation (it would silently drop exclusions such as YOLO's Detect head), so it is an error."""
    import yaml
    res = resources.files("depthprune.models").joinpath("recipes").joinpath(f"{name}.yaml")
    if not res.is_file():
        raise UserError(f"recipe {name}.yaml is missing from the depthprune package (a broken installation); "
                        "reinstall depthprune")
    data = yaml.safe_load(res.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise UserError(f"recipe {name}.yaml is not a mapping; reinstall depthprune")
    return data
