"""Hydra examples of lightning_smd: ``python examples/train.py experiment=quickstart``.

``examples.train`` is the entry point; ``examples.modules`` holds the LightningModules
(classification, detection, Noisy Rayleigh Quotient) and ``examples.data`` the DataModules
(sklearn digits, CIFAR10, ImageNet folders, COCO, NRQ step indices).
"""
