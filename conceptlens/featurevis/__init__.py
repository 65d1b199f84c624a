"""Feature visualisation (Olah et al. 2017; Lucid/lucent): images optimised to maximise an objective.

``visualize(model, [channel("conv4", 3), unit("conv4", 5), class_logit(2)])`` optimises one image
per objective, in batches, through a Fourier parameterisation and random robustness transforms,
and returns a :class:`Visualization` (uint8 images, achieved objective values, provenance).
:func:`activation_atlas` lays out a layer's activations over a dataset in 2-D and draws each grid
cell's mean activation (Carter et al. 2019).
"""

from .atlas import ActivationAtlas, activation_atlas
from .objectives import Objective, channel, class_logit, direction, diversity, input_alpha, input_l2, input_tv, match, unit
from .param import ImageParam, fourier, pixel
from .render import Visualization, class_models, invert, objective_values, visualize
from .transforms import RobustnessTransforms, default_transforms

__all__ = ["visualize", "Visualization", "objective_values", "class_models", "Objective", "channel", "unit", "direction",
           "class_logit", "diversity", "input_l2", "match", "input_alpha", "input_tv", "invert", "ImageParam", "pixel", "fourier", "RobustnessTransforms", "default_transforms",
           "activation_atlas", "ActivationAtlas"]
