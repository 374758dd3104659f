"""Class-contrastive back-propagation explanations (Wang & Wang, NeurIPS 2022), as a library.

    from contrastive_explanations import GradCAM, build_model
    net = build_model("efficientnet_lite0")
    e = GradCAM(net)(images, classes, ["original", "weighted"])   # signed maps, one backward pass

Written by hand (the chapters in nbs/ export the modules it names): methods/ holds the methods and targets,
data/ the models, datasets and sources, experiments/ the book's experiments; files and metrics lie below everything,
the results store above the data, and run (profiles, preflight, the command line), cli and explorer sit at the top.
Importing the package imports nothing else: each public name loads its module (and torch) when first used (PEP 562),
so that `contrastive-explain --help` and `__version__` need no torch."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_METHODS = ["METHODS", "TARGETS", "Method", "Explanation", "Target", "get_target", "Gradient", "LinearApproximation",
            "GradCAM", "XGradCAM", "FullGrad", "ViTGradCAM", "AttentionRollout", "OriginalTarget", "MeanTarget",
            "MaxTarget", "WeightedTarget", "WeightedLogTarget", "VersusTarget", "FinerWeightedTarget",
            "FinerMeanTarget", "ReSTTarget"]
_HOMES = {**{name: ".methods" for name in _METHODS}, "MODELS": ".data.models", "build_model": ".data.models"}
_SUBMODULES = {"methods", "data", "experiments", "files", "metrics", "results", "run", "viz", "explorer", "cli", "claims"}

__all__ = [*_METHODS, "MODELS", "build_model", "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and editors; at run time they load on first use
    from .data.models import MODELS, build_model
    from .methods import (METHODS, TARGETS, AttentionRollout, Explanation, FinerMeanTarget,
                          FinerWeightedTarget, FullGrad, GradCAM, Gradient, LinearApproximation, MaxTarget, MeanTarget,
                          Method, OriginalTarget, ReSTTarget, Target, VersusTarget, ViTGradCAM, WeightedLogTarget,
                          WeightedTarget, XGradCAM, get_target)


def __getattr__(name: str):
    "A public name (or a submodule) of the package, imported on first use and then kept."
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name], __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_SUBMODULES})
