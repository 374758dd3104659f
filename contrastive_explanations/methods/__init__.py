"""The explanation methods and their targets (written by hand: the chapters export the modules it names).

`METHODS` is the one registry of methods, keyed by `Method.name`; results tables use these names as labels."""
from .cam import GradCAM, LinearApproximation, XGradCAM
from .explain import ActivationMethod, Explanation, Method
from .fullgrad import FullGrad
from .gradient import Gradient
from .targets import (TARGETS, FinerMeanTarget, FinerWeightedTarget, MaxTarget, MeanTarget,
                      OriginalTarget, ReSTTarget, Target, VersusTarget, WeightedLogTarget, WeightedTarget, get_target)
from .vit import AttentionRollout, ViTGradCAM

METHODS: dict[str, type[Method]] = {m.name: m for m in (
    Gradient, LinearApproximation, GradCAM, XGradCAM, FullGrad, ViTGradCAM, AttentionRollout)}



def make_method(name: str, # a key of METHODS, e.g. 'gradcam'
                model, # the network to explain (a torch.nn.Module)
                layer=None, # an activation method's layer (a name or a module); None: the model's default layer
                **options, # the method's other arguments, e.g. variant='signed' for attention_rollout
               ) -> Method:
    """The method registered as `name`, on `model`: the one way the package, its chapters and its command line build one.

    Parameters:
        name: a key of METHODS, e.g. 'gradcam' (an unknown name is refused with the known ones)
        model: the network to explain, a torch.nn.Module
        layer: an activation method's layer, a name or a module (None: the model's default layer); a method that
            explains the input or a ViT's blocks takes none
        options: the method's other arguments, e.g. variant='signed' for 'attention_rollout', block=-2 for 'vit_gradcam'
    Returns:
        the method, an instance of METHODS[name]: call it as method(x, classes=None, targets='weighted')
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    if layer is None:
        return cls(model, **options)
    if not issubclass(cls, ActivationMethod):
        raise ValueError(f"{name} takes no layer: it explains the input (or a ViT's blocks); drop the layer")
    return cls(model, layer, **options)


__all__ = ["METHODS", "make_method", "TARGETS", "Method", "Explanation", "Target", "get_target", "Gradient", "LinearApproximation",
           "GradCAM", "XGradCAM", "FullGrad", "ViTGradCAM", "AttentionRollout", "OriginalTarget", "MeanTarget",
           "MaxTarget", "WeightedTarget", "WeightedLogTarget", "VersusTarget", "FinerWeightedTarget",
           "FinerMeanTarget", "ReSTTarget"]
