"""Per-channel pictures: TensorBoard and W&B histograms per layer on the per-channel steps (read back
from the event file and the offline run file), and the quantile-band and heatmap figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_smd import SMDCallback, theory
from lightning_smd.report.channel_figures import (CHANNEL_FIGURE_FILES, HIST_PREFIX, default_heatmap_layer,
                                           save_channel_figures)
from lightning_smd.core.channels import ChannelMetrics
from lightning_smd.report.series import read_wandb_records
from tests.models import DigitsCNN

wandb = pytest.importorskip("wandb")




@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_histograms_to_tensorboard_and_wandb_and_figures(tmp_path: Path, offline_wandb):
    torch.manual_seed(0)
    every, channel_every, max_steps = 2, 4, 12
    smd = SMDCallback(log_every_n_steps=every, per_channel=channel_every, verbose=False)
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb"),
               WandbLogger(offline=True, save_dir=str(tmp_path), project="smd-test")]
    trainer = pl.Trainer(max_steps=max_steps, logger=loggers, callbacks=[smd], log_every_n_steps=every,
                         accelerator="cpu", enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    trainer.fit(DigitsCNN())
    wandb.finish()
    wandb.teardown()
    names = sorted(smd.units)
    channel_steps = sorted(s for s, m in smd.records if any(k.startswith("smd/channel/") for k in m))
    assert channel_steps and all((s + 1) % channel_every == 0 for s in channel_steps)
    expected = {f"{HIST_PREFIX}/{kind}/{n}" for n in names for kind in ("angular_update_ratio", "weight_norm")}

    # TensorBoard: one histogram per layer and kind on every per-channel step, over all its units
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

    (event_dir,) = {p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(event_dir), size_guidance={HISTOGRAMS: 0})
    acc.Reload()
    assert expected <= set(acc.Tags()["histograms"])
    for n in names:
        events = acc.Histograms(f"{HIST_PREFIX}/angular_update_ratio/{n}")
        assert sorted(e.step for e in events) == channel_steps
        assert events[-1].histogram_value.num == smd.units[n].count
        np.testing.assert_allclose(events[-1].histogram_value.sum, np.sum(smd.channels.latest[n]), rtol=1e-5)

    # W&B: wandb.Histogram values (its native histogram panels) on the same steps
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    seen: dict[str, list[int]] = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") != "history":
            continue
        # a wandb.Histogram is stored as nested items: {key}._type = "histogram", .values, .bins
        items = {tuple(item.nested_key) or (item.key,): json.loads(item.value_json) for item in record.history.item}
        for path, value in items.items():
            if len(path) == 2 and path[1] == "_type" and value == "histogram" and path[0].startswith(HIST_PREFIX):
                assert sum(items[(path[0], "values")]) > 0
                seen.setdefault(path[0], []).append(int(items[("trainer/global_step",)]))
    assert expected <= set(seen)
    assert all(sorted(steps) == channel_steps for key, steps in seen.items() if key in expected)

    # figures: written with the others at the end of fit
    figures = Path(trainer.loggers[0].log_dir) / "smd"
    for file in CHANNEL_FIGURE_FILES.values():
        assert (figures / file).is_file() and (figures / file).stat().st_size > 1000


def test_figures_from_channel_metrics_and_default_layer(tmp_path: Path):
    group = theory.GroupTheory("sgdm", 0.1, 5e-4, momentum=0.9)
    channels = ChannelMetrics(window=100, ema_steps=50)
    rng = np.random.default_rng(0)
    for step in range(0, 500, 50):
        delta = group.angular_update * rng.uniform(0.5, 1.5, size=24)
        delta[20:] = 0.0  # four dead filters in "b"
        units = np.stack([delta, rng.uniform(1, 2, size=24), rng.uniform(0.5, 1.5, size=24)])
        channels.build(units, ["a", "b"], [12, 12], [group, group], step, step)
    assert channels.stalled == {"a": 0.0, "b": pytest.approx(4 / 12)}
    assert default_heatmap_layer(channels) == "b"
    written = save_channel_figures(channels, tmp_path)
    assert set(written) == set(CHANNEL_FIGURE_FILES)
    assert all(p.is_file() for p in written.values())
    assert save_channel_figures(None, tmp_path) == {}


def test_unit_history_thins_evenly():
    from lightning_smd.core.channels import UnitHistory

    history = UnitHistory(capacity=8)
    for step in range(100):
        history.append(step, np.full(3, float(step)))
    assert len(history.columns) <= 8 and history.matrix().shape == (3, len(history.steps))
    gaps = np.diff(history.steps)
    assert (gaps == gaps[0]).all() and history.steps[0] == 0


def test_shared_unit_history_matches_per_tensor_records_when_the_layout_changes():
    """The tensors of one layout share one record of whole columns; when a tensor moves to another
    layout (tracked set changed) it continues in a record of its own: every tensor's history is
    what one record per tensor (the reference) holds."""
    from lightning_smd.core.channels import UnitHistories, UnitHistory

    shared = UnitHistories(capacity=4)
    reference: dict[str, UnitHistory] = {}
    layouts = [(["a", "b"], [2, 3])] * 7 + [(["a", "b", "c"], [2, 3, 1])] * 6 + [(["d"], [2])] * 3
    for step, (names, counts) in enumerate(layouts):
        ends = np.cumsum(counts).tolist()
        values = np.arange(ends[-1], dtype=np.float32) + 10 * step
        shared.append((tuple(names), tuple(counts)), names, ends, step, values)
        for name, a, b in zip(names, [0] + ends[:-1], ends):
            reference.setdefault(name, UnitHistory(4)).append(step, values[a:b])
    assert set(shared) == set(reference) and len(shared) == 4
    for name, ref in reference.items():
        got = shared[name]
        assert list(got.steps) == ref.steps and len(got.columns) == len(ref.columns)
        np.testing.assert_array_equal(got.matrix(), ref.matrix())
