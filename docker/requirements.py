"""Print one layer's share of etsq's requirements (pyproject.toml), for the worker image.

    python docker/requirements.py base  pyproject.toml   # everything that installs without torch
    python docker/requirements.py torch pyproject.toml   # what needs torch (torch itself excluded)

The image installs `base` before torch, so changing the torch build (a build argument) reuses that
layer; `torch` comes after torch, so pip resolves it against the build already installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# Distributions that depend on torch: pip would fetch torch (PyPI's default, a CUDA build) for them.
NEEDS_TORCH = frozenset({"accelerate", "sentence-transformers"})
EXTRAS = ("monitor",)  # Flower runs from the same image


def requirements(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return [*project["dependencies"], *extras]


def name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def layer(which: str, pyproject: Path) -> list[str]:
    reqs = [r for r in requirements(pyproject) if name(r) != "torch"]
    if which == "base":
        return [r for r in reqs if name(r) not in NEEDS_TORCH]
    if which == "torch":
        return [r for r in reqs if name(r) in NEEDS_TORCH]
    raise SystemExit(f"unknown layer {which!r}: base or torch")


if __name__ == "__main__":
    print("\n".join(layer(sys.argv[1], Path(sys.argv[2]))))
