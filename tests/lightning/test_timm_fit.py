"""timm CNNs built on ``BatchNormAct2d`` (EfficientNet, MobileNetV3, RegNet, ...) train under
``SMDCallback()`` in a real ``Trainer.fit``.

Detection re-runs a norm module with its own ``forward`` on the recorded inputs, between the
first forward and its backward. BatchNorm in train mode saves its running statistics for the
backward (``native_batch_norm_backward`` takes them); writing them in place there broke every
such model at the first backward with "modified by an inplace operation".
"""

from __future__ import annotations

import pytest
import torch

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002"])
def test_batchnormact_model_trains_with_callback(name):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_smd import SMDCallback

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=4)
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 4, (8,))

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return torch.nn.functional.cross_entropy(self.net(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    data = DataLoader(TensorDataset(x, y), batch_size=4)
    cb = SMDCallback(verbose=False, log_every_n_steps=1, per_channel=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Module(), data)
    assert trainer.global_step == 6
    # the convs feeding BatchNormAct2d are found, as find_scale_invariant finds them
    assert any(n.startswith("net.") and n.endswith(".weight") for n in cb.candidates)
