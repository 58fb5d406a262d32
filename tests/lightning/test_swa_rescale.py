"""A rescale during weight averaging rescales the average too (the README promises SWA copies are
rescaled), for both kinds Lightning ships: ``StochasticWeightAveraging`` keeps its average as a
deepcopy of the LightningModule (``_average_model``), ``WeightAveraging`` (SWA's equal average by
default) as a torch ``AveragedModel`` around it.

The rescale happens inside the optimizer's step (its pre-hook): the average is read at the batch
start and again at the batch end, before the averaging callback's own update of that batch
(callbacks run in list order; ``StochasticWeightAveraging`` only updates at epoch starts)."""

from __future__ import annotations

import math
import warnings

import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.callbacks import StochasticWeightAveraging, WeightAveraging

from lightning_smd import SMDCallback
from tests.helpers import fit
from tests.models import NoisyRayleighQuotient


def _average_x(trainer) -> torch.Tensor:
    averaging = next(cb for cb in trainer.callbacks if isinstance(cb, (StochasticWeightAveraging, WeightAveraging)))
    average = averaging._average_model
    return getattr(average, "module", average).X.detach().clone()  # AveragedModel.module, or the deepcopy


class AverageX(pl.Callback):
    """The average's X at every batch start and every batch end (``(step, "start"|"end")``)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen[trainer.global_step, "start"] = _average_x(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step - 1, "end"] = _average_x(trainer)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["StochasticWeightAveraging", "WeightAveraging"])
def test_swa_average_is_rescaled_during_swa(tmp_path, kind):
    if kind == "StochasticWeightAveraging":
        # SWA from epoch 1, its SWALR takes the LR from 0.1 to 0.01 in one epoch: a drop by 10 during SWA
        module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0)
        averaging = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
        limits = {"max_steps": -1, "max_epochs": 4, "limit_train_batches": 20}
    else:  # a torch AveragedModel updated after every step, the LR dropped by 10 at step 30
        module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0, milestones=[30])
        averaging = WeightAveraging()
        limits = {"max_steps": 40}
    seen = AverageX()
    smd = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, tmp_path, [seen, averaging, smd], **limits)
    assert smd.rescale_events, "the drop during averaging was rescaled"
    event = smd.rescale_events[0]
    assert event["step"] >= 20 and math.isclose(event["factor"], 10**-0.25, rel_tol=1e-6)
    assert event["averaged_models"] == 1
    step = event["step"]
    before, after = seen.seen[step, "start"], seen.seen[step, "end"]
    assert not torch.allclose(before, torch.zeros_like(before))
    torch.testing.assert_close(after, before * event["factor"])
    # the step before did not touch the average (only the rescale does, within a step)
    torch.testing.assert_close(seen.seen[step - 1, "end"], seen.seen[step - 1, "start"])
