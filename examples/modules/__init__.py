"""Reusable LightningModules of the examples; optimizer and scheduler come in as partials."""

from examples.modules.classification import ImageClassifier
from examples.modules.detection import MaskRCNNModule
from examples.modules.homogeneous import HomogeneousClassifier, WeightNormComparison
from examples.modules.nrq import NoisyRayleighQuotient
from examples.modules.optim import ConfiguredOptimizerModule, param_groups, warmup_multistep
from examples.modules.qknorm_transformer import QKNormTransformer

__all__ = [
    "ConfiguredOptimizerModule",
    "HomogeneousClassifier",
    "ImageClassifier",
    "MaskRCNNModule",
    "NoisyRayleighQuotient",
    "QKNormTransformer",
    "param_groups",
    "WeightNormComparison",
    "warmup_multistep",
]
