"""Lightning's own ``StochasticWeightAveraging`` keeps its average as a deepcopy of the
LightningModule (``_average_model``), not a torch ``AveragedModel``: a rescale during SWA must
rescale that average too (the README promises SWA copies are rescaled)."""

from __future__ import annotations

import math
import warnings

import pytorch_lightning as pl
import pytest
import torch
from pytorch_lightning.callbacks import StochasticWeightAveraging

from lightning_smd import SMDCallback
from tests.helpers import fit
from tests.models import NoisyRayleighQuotient


class AverageX(pl.Callback):
    """The SWA average's X at every batch start (before or after SMDCallback, by list order)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        swa = next(cb for cb in trainer.callbacks if isinstance(cb, StochasticWeightAveraging))
        self.seen[trainer.global_step] = swa._average_model.X.detach().clone()


@pytest.mark.slow
@pytest.mark.xfail(reason="passed on its branch, fails after the round-3 merge (rescale moved into the step pre-hook): open, issue 22", strict=False)
def test_swa_average_is_rescaled_during_swa(tmp_path):
    # SWA from epoch 1, its SWALR takes the LR from 0.1 to 0.01 in one epoch: a drop by 10 during SWA
    module = NoisyRayleighQuotient(p=16, sigma=0.5, lr=0.1, weight_decay=0.05, init_norm=2.0)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1, annealing_epochs=1)
    before, after = AverageX(), AverageX()
    smd = SMDCallback(log_every_n_steps=5, rescale=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(module, tmp_path, [swa, before, smd, after], max_steps=-1, max_epochs=4, limit_train_batches=20)
    assert smd.rescale_events, "SWALR's drop was rescaled"
    event = smd.rescale_events[0]
    assert event["step"] >= 20 and math.isclose(event["factor"], 10**-0.25, rel_tol=1e-6)
    assert event["averaged_models"] == 1
    step = event["step"]
    torch.testing.assert_close(after.seen[step], before.seen[step] * event["factor"])
