"""Class-contrastive back-propagation explanations (Wang & Wang, NeurIPS 2022), as a library.

    from contrastive_explanations import GradCAM, build_model
    net = build_model("efficientnet_lite0")
    e = GradCAM(net)(images, classes, ["original", "weighted"])   # signed maps, one backward pass

Written by hand (the chapters in nbs/ export the modules it names): methods/ holds the methods and targets,
data/ the models and datasets, experiments/ the book's experiments; results, viz and explorer sit at the top."""
__version__ = "0.1.0"

from .data.models import MODELS, build_model
from .methods import (METHODS, TARGETS, AttentionRollout, Explanation, FullGrad, GradCAM, Gradient,
                      LinearApproximation, MaxTarget, MeanTarget, Method, OriginalTarget, Target, ViTGradCAM,
                      WeightedLogTarget, WeightedTarget, XGradCAM, get_target)

__all__ = ["METHODS", "TARGETS", "Method", "Explanation", "Target", "get_target", "Gradient", "LinearApproximation",
           "GradCAM", "XGradCAM", "FullGrad", "ViTGradCAM", "AttentionRollout", "OriginalTarget", "MeanTarget",
           "MaxTarget", "WeightedTarget", "WeightedLogTarget", "MODELS", "build_model", "__version__"]
