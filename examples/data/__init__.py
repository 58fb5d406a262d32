"""DataModules of the examples; all read the real on-disk formats, none downloads by default."""

from examples.data.cifar import CIFAR10DataModule, UnverifiedCIFAR10
from examples.data.coco import COCODataModule, CocoInstances
from examples.data.common import DatasetError, DatasetNotFoundError
from examples.data.digits import DigitsDataModule
from examples.data.full_batch import FullBatchDataModule
from examples.data.imagenet import ImageNetDataModule
from examples.data.markov import MarkovSequenceDataModule
from examples.data.nrq import StepIndexDataModule

__all__ = [
    "CIFAR10DataModule",
    "COCODataModule",
    "CocoInstances",
    "DatasetError",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "FullBatchDataModule",
    "ImageNetDataModule",
    "MarkovSequenceDataModule",
    "StepIndexDataModule",
    "UnverifiedCIFAR10",
]
