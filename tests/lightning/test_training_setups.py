"""The same numbers under every training setup: strategy × precision × accumulation (and the
optimizer families), each compared with a single-process fp32 run on the same global batches.

Multi-process runs are real (2 CPU processes, gloo), started once for the whole matrix by
``tests.setups_common.launch``: DDP as two *nodes* of one process (the multi-node layout,
``NODE_RANK`` set, Lightning does not relaunch), FSDP2 as ``ModelParallelStrategy`` + ``fully_shard``
on one node of two processes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_smd import SMDCallback
from tests.setups_common import TinyNet, WeightRecorder, launch, metrics_of, run_setup, smd_series

STEPS = 12


def assert_same_series(got, want, rel, abs_=1e-7, what=""):
    """Same metric keys, same steps, values within tolerance."""
    got, want = smd_series(got), smd_series(want)
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:6]}"
    worst = (0.0, None)
    for key, series in want.items():
        assert sorted(got[key]) == sorted(series), f"{what}: {key} logged at other steps"
        for step, value in series.items():
            err = abs(got[key][step] - value) / (abs(value) + abs_ / rel)
            worst = max(worst, (err, (key, step, got[key][step], value)), key=lambda x: x[0])
    assert worst[0] <= rel, f"{what}: worst relative difference {worst[0]:.2e} at {worst[1]}"


# ------------------------------------------------------------------ single-process references
@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    runs = {
        "32-a1": {},
        "32-a4": {"accumulate": 4},
        "bf16-a1": {"precision": "bf16-mixed"},
        "adamw": {"model_kwargs": {"optimizer": "adamw"}},
        # warm start at step 6 (factors from rank 0's running L, broadcast), rescale at the LR drop (8)
        "rescale": {"model_kwargs": {"milestones": (8,)}, "callback_kwargs": {"rescale": True, "warm_start": 6}},
        "step-indexed": {"model_kwargs": {"step_indexed": True}},
    }
    for name, kw in runs.items():
        run_setup(root, name, steps=STEPS, **kw)
    return {name: metrics_of(root, name) for name in runs}


MULTI = [
    {"name": "ddp-32-a1", "strategy": "ddp", "devices": 1, "num_nodes": 2},
    {"name": "ddp-32-a4", "strategy": "ddp", "devices": 1, "num_nodes": 2, "accumulate": 4},
    {"name": "ddp-bf16-a1", "strategy": "ddp", "devices": 1, "num_nodes": 2, "precision": "bf16-mixed"},
    {"name": "fsdp2-32-a1", "strategy": "fsdp2", "devices": 2},
    {"name": "fsdp2-32-a4", "strategy": "fsdp2", "devices": 2, "accumulate": 4},
    {"name": "fsdp2-bf16-a1", "strategy": "fsdp2", "devices": 2, "precision": "bf16-mixed"},
    {"name": "fsdp2-adamw", "strategy": "fsdp2", "devices": 2, "model_kwargs": {"optimizer": "adamw"}},
    {"name": "fsdp2-rescale", "strategy": "fsdp2", "devices": 2, "model_kwargs": {"milestones": [8]},
     "callback_kwargs": {"rescale": True, "warm_start": 6}},
    # DDP: only rank 0 measures and holds L; rank 1 applies the warm start's broadcast factors
    {"name": "ddp-rescale", "strategy": "ddp", "devices": 1, "num_nodes": 2, "model_kwargs": {"milestones": [8]},
     "callback_kwargs": {"rescale": True, "warm_start": 6}},
    # the fault: killed at step 10 (checkpoints every 4 steps), resumed from step 8's sharded checkpoint
    {"name": "fsdp2-crash", "strategy": "fsdp2", "devices": 2, "model_kwargs": {"step_indexed": True},
     "ckpt_every": 4, "crash_at": 10},
    {"name": "fsdp2-resumed", "strategy": "fsdp2", "devices": 2, "model_kwargs": {"step_indexed": True},
     "resume": "fsdp2-crash"},
    {"name": "ddp-crash", "strategy": "ddp", "devices": 1, "num_nodes": 2, "model_kwargs": {"step_indexed": True},
     "ckpt_every": 4, "crash_at": 10},
    {"name": "ddp-resumed", "strategy": "ddp", "devices": 1, "num_nodes": 2, "model_kwargs": {"step_indexed": True},
     "resume": "ddp-crash"},
]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    launch(2, [{**s, "steps": STEPS} for s in MULTI], root, timeout=600)  # 13 runs in one launch
    metrics = {s["name"]: metrics_of(root, s["name"]) for s in MULTI if "crash_at" not in s}
    ranks = {s["name"]: [json.loads((root / f"{s['name']}.rank{r}.json").read_text()) for r in range(2)] for s in MULTI}
    return metrics, ranks


FP32_SAME = {  # setup -> reference; fp32: equal up to float reassociation
    "ddp-32-a1": "32-a1", "ddp-32-a4": "32-a1", "fsdp2-32-a1": "32-a1", "fsdp2-32-a4": "32-a1",
    "fsdp2-adamw": "adamw", "fsdp2-rescale": "rescale", "ddp-rescale": "rescale",
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(FP32_SAME))
def test_matrix_fp32_equals_single_process(multi, single, setup):
    metrics, ranks = multi
    assert_same_series(metrics[setup], single[FP32_SAME[setup]], rel=2e-4, what=setup)
    # every rank tracks the same tensors (detection's result is broadcast from rank 0)
    assert ranks[setup][0]["candidates"] == ranks[setup][1]["candidates"] == ["net.0.weight", "net.3.weight"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["ddp-bf16-a1", "fsdp2-bf16-a1"])
def test_matrix_bf16_mixed(multi, single, setup):
    metrics, ranks = multi
    assert ranks[setup][0]["candidates"] == ranks[setup][1]["candidates"] == ["net.0.weight", "net.3.weight"]
    # the same bf16 autocast computations on half batches: close to the single-process bf16 run
    # (bf16 matmuls of 8 vs 16 rows round differently; the one-sample ‖g‖²‖w‖² feels it most)...
    got, want = metrics[setup], single["bf16-a1"]
    assert sorted(smd_series(got)) == sorted(smd_series(want))
    grads = lambda m, keep: {k: v for k, v in m.items() if ("unit_grad" in k or "weight_norm_theory" in k) == keep}  # noqa: E731
    assert_same_series(grads(got, False), grads(want, False), rel=5e-2, what=setup)
    assert_same_series(grads(got, True), grads(want, True), rel=0.15, what=setup)
    # ...and the angular updates close to fp32's (statistics accumulate in fp32 either way)
    for name in ("net.0.weight", "net.3.weight"):
        bf16 = metrics[setup][f"smd/angular_update/{name}"]
        fp32 = single["32-a1"][f"smd/angular_update/{name}"]
        for step, value in fp32.items():
            assert bf16[step] == pytest.approx(value, rel=0.1), (name, step)


@pytest.mark.slow
def test_matrix_bf16_mixed_same_across_strategies(multi):
    """Same precision and same per-rank batches: DDP and FSDP2 agree to float reassociation."""
    metrics, _ = multi
    assert_same_series(metrics["fsdp2-bf16-a1"], metrics["ddp-bf16-a1"], rel=2e-4, what="fsdp2 vs ddp, bf16-mixed")


@pytest.mark.slow
def test_rescale_identical_on_shards(multi, single):
    """The warm start (step 6: factors computed on rank 0, broadcast, applied on every rank: the
    series after it equal one process's, see the fp32 matrix) and the rescale at the LR drop."""
    metrics, _ = multi
    for setup in ("fsdp2-rescale", "ddp-rescale"):
        assert metrics[setup]["smd/rescale_factor"] == pytest.approx(single["rescale"]["smd/rescale_factor"]), setup
    assert list(single["rescale"]["smd/rescale_factor"]) == [6, 8]
    assert single["rescale"]["smd/rescale_factor"][6] != pytest.approx(1.0, abs=0.05)  # the warm start moved the norms


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_killed_and_resumed_run_logs_the_uninterrupted_series(multi, single, strategy):
    """Resume restores callback state after on_fit_start on FSDP2 (sharded checkpoint), before it on DDP."""
    metrics, ranks = multi
    resumed, straight = smd_series(metrics[f"{strategy}-resumed"]), smd_series(single["step-indexed"])
    assert ranks[f"{strategy}-resumed"][0]["global_step"] == STEPS
    assert min(resumed["smd/angular_update/net.0.weight"]) == 8  # starts at the checkpoint...
    for key, series in resumed.items():  # ...and continues the uninterrupted run's series exactly
        for step, value in series.items():
            assert value == pytest.approx(straight[key][step], rel=2e-4, abs=1e-7), (key, step)
    assert set(resumed) == {k for k, v in straight.items() if any(s >= 8 for s in v)}


# ------------------------------------------------------------------ single process, fast
@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_accumulation_measures_per_optimizer_step(single):
    """accumulate_grad_batches=4 on batches of 4 == batch 16: one measurement per optimizer step."""
    assert_same_series(single["32-a4"], single["32-a1"], rel=2e-4, what="accumulate=4")
    assert sorted(single["32-a1"]["smd/angular_update/net.0.weight"]) == list(range(4, STEPS))  # detection: steps 1-3


def test_param_groups_get_their_own_theory(single):
    m = single["32-a1"]
    from lightning_smd import theory

    # both hidden weights are in group "hidden" (lr 0.2, wd 5e-3, momentum 0.9)
    assert m["smd/angular_update_theory/net.0.weight"][5] == pytest.approx(theory.angular_update_sgdm(0.2, 5e-3, 0.9))
    assert "smd/angular_update/net.6.weight" not in m  # classifier: not scale-invariant


@pytest.mark.slow  # over 3 s on 2 cores (default run under 4 minutes)
def test_torch_compile_maps_names_back(tmp_path, single):
    trainer, cb = run_setup(tmp_path, "compiled", steps=STEPS, model_kwargs={"compile": True})
    assert set(cb.candidates) == {"net.0.weight", "net.3.weight"}
    assert_same_series(metrics_of(tmp_path, "compiled"), single["32-a1"], rel=2e-4, what="torch.compile")


def test_bf16_true_parameters_are_measured_as_applied(tmp_path, single):
    """bf16 parameters: the applied (rounded) update is measured from a snapshot, in fp32."""
    recorder = WeightRecorder()
    trainer, cb = run_setup(tmp_path, "bf16-true", steps=STEPS, precision="bf16-true", callbacks=[recorder])
    assert set(cb.candidates) == {"net.0.weight", "net.3.weight"}  # bf16 radial cosines: ~1e-4, not 1e-8
    assert {s.mode for s in cb._measurer.slices} == {"snapshot"}
    m = metrics_of(tmp_path, "bf16-true")
    for name in ("net.0.weight", "net.3.weight"):
        truth = recorder.true_angles(name)
        for step, value in m[f"smd/angular_update/{name}"].items():
            assert value == pytest.approx(truth[step], rel=1e-3, abs=1e-6), (name, step)
            assert value == pytest.approx(single["32-a1"][f"smd/angular_update/{name}"][step], rel=0.3)


# ------------------------------------------------------------------ manual optimization, GAN-style
class TwoOptimizers(TinyNet):
    """Manual optimization with two optimizers on disjoint halves (a GAN's G and D): SGD with
    momentum on the first block, AdamW on the second, each stepping once per batch."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_a, opt_b = self.optimizers()
        for opt in (opt_a, opt_b):
            self.toggle_optimizer(opt)
            loss = torch.nn.functional.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()
            self.untoggle_optimizer(opt)

    def configure_optimizers(self):
        first = [p for n, p in self.named_parameters() if n.startswith(("net.0", "net.1"))]
        second = [p for n, p in self.named_parameters() if not n.startswith(("net.0", "net.1"))]
        return (torch.optim.SGD(first, lr=0.2, momentum=0.9, weight_decay=5e-3),
                torch.optim.AdamW(second, lr=1e-2, weight_decay=0.1))


def test_manual_optimization_two_optimizers(tmp_path):
    import pytorch_lightning as pl

    from lightning_smd import theory
    from pytorch_lightning.loggers import CSVLogger

    recorder = WeightRecorder()
    cb = SMDCallback(log_every_n_steps=1, verbose=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=2 * STEPS, logger=CSVLogger(tmp_path, name="gan", version=0),
                         callbacks=[cb, recorder], log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(TwoOptimizers(steps=STEPS))
    assert trainer.global_step == 2 * STEPS  # global_step counts step() calls, the log step batches
    assert set(cb.candidates) == {"net.0.weight", "net.3.weight"}
    m = metrics_of(tmp_path, "gan")
    assert m["smd/angular_update_theory/net.0.weight"][5] == pytest.approx(theory.angular_update_sgdm(0.2, 5e-3, 0.9))
    assert m["smd/angular_update_theory/net.3.weight"][5] == pytest.approx(math.sqrt(2 * 1e-2 * 0.1 * 0.1 / 1.9))
    for name in ("net.0.weight", "net.3.weight"):
        truth = recorder.true_angles(name)
        logged = m[f"smd/angular_update/{name}"]
        assert sorted(logged) == list(range(min(logged), STEPS))  # every batch after detection, both optimizers
        for step, value in logged.items():
            assert value == pytest.approx(truth[step], rel=1e-4), (name, step)
