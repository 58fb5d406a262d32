"""The zoo's second tier: every zoo model trains in a real ``Trainer.fit`` under ``SMDCallback()``
with its defaults, and the callback's decision equals :func:`find_scale_invariant`'s on the same
model and batch: one decision, one code path.

``SMDCallback()`` decides after its first update plus ``detect_steps`` (3) radial-cosine steps,
so each fit runs 4 optimizer steps. The default run keeps a few models, among them timm's
``BatchNormAct2d`` (the fused norm + activation that crashed at the first backward) and the two
torchvision models where the callback and the function used to disagree (eps-dominated
depthwise convs, decided by the chance alignment of a gradient); ``-m slow`` runs them all.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from lightning_smd.core.detect import find_scale_invariant
from tests.zoo import ZooModel, zoo

pytest.importorskip("torchvision")
pytest.importorskip("timm")

FIT_STEPS = 4  # the first update + SMDCallback's default detect_steps=3
DEFAULT_TIER = {"tv/mobilenet_v3_small(0.5)", "tv/efficientnet_b0(0.25)", "timm/mobilenetv3_small_050"}


def _loss(out) -> Tensor:
    """Scalar losses (detectors' loss dicts) are summed; other outputs enter as a mean square."""
    leaves = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point() and t.requires_grad]
    return sum(t if t.ndim == 0 else t.float().square().mean() for t in leaves)


def fit_decision(entry: ZooModel, root, steps: int = FIT_STEPS) -> tuple[set[str], set[str], int]:
    """(the callback's tensors, find_scale_invariant's, optimizer steps taken) on one fresh model."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from lightning_smd import SMDCallback

    torch.manual_seed(0)
    net = entry.build()
    args, kwargs = entry.batch(torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        function = {c.name for c in find_scale_invariant(net, *args, **kwargs)}

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            return _loss(self.net(*batch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    cb = SMDCallback()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, default_root_dir=root, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), DataLoader([tuple(args)] * steps, batch_size=None))
    assert cb._engine.detection.done, "SMDCallback did not decide within the fit"
    callback = {n[len("net."):] for n in cb.candidates if n.startswith("net.")}
    return callback, function, trainer.global_step


def _params(names: set[str]) -> list:
    return [pytest.param(z.name, marks=() if z.name in names else pytest.mark.slow) for z in zoo()]


@pytest.mark.parametrize("name", _params(DEFAULT_TIER))
def test_fit_decision_equals_find_scale_invariant(name, tmp_path):
    entry = next(z for z in zoo() if z.name == name)
    callback, function, steps = fit_decision(entry, tmp_path)
    assert steps == FIT_STEPS
    assert callback == function, f"callback only: {sorted(callback - function)}; function only: {sorted(function - callback)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenet_v3_small"])
def test_full_torchvision_model_one_decision(name, tmp_path):
    """The issue's repro: full-width torchvision models (47 against 42 and 20 against 22 before)."""
    import torchvision.models as tvm

    from tests.zoo import _classifier

    entry = _classifier(f"tv/{name}", lambda: getattr(tvm, name)(weights=None, num_classes=4), size=64)
    callback, function, _ = fit_decision(entry, tmp_path)
    assert callback == function, f"callback only: {sorted(callback - function)}; function only: {sorted(function - callback)}"
