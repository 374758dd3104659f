"""The explanation methods and their targets (written by hand: the chapters export the modules it names).

`METHODS` is the one registry of methods, keyed by `Method.name`; results tables use these names as labels."""
from .cam import GradCAM, LinearApproximation, XGradCAM
from .explain import Explanation, Method
from .fullgrad import FullGrad
from .gradient import Gradient
from .targets import (TARGETS, MaxTarget, MeanTarget, OriginalTarget, Target, WeightedLogTarget, WeightedTarget,
                      get_target)
from .vit import AttentionRollout, ViTGradCAM

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Gradient, LinearApproximation, GradCAM, XGradCAM, FullGrad, ViTGradCAM, AttentionRollout)}

__all__ = ["METHODS", "TARGETS", "Method", "Explanation", "Target", "get_target", "Gradient", "LinearApproximation",
           "GradCAM", "XGradCAM", "FullGrad", "ViTGradCAM", "AttentionRollout", "OriginalTarget", "MeanTarget",
           "MaxTarget", "WeightedTarget", "WeightedLogTarget"]
