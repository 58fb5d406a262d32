"""DTensor layouts as users write them under ``ModelParallelStrategy`` (real ``Trainer.fit``, gloo,
CPU), each equal to a single-process run on the same global batches, a rescale at an LR drop
(step 8, applied to the local shards) included:

* FSDP2 as PyTorch's tutorial writes it: ``fully_shard(layer)`` per block, then the root, no
  ``mesh=`` (every call builds a new, equal default mesh): 2 processes;
* HSDP: ``fully_shard(..., mesh=(replicate, shard))``: sums over the shard dimension only,
  replicas not double counted: 4 processes (2 × 2);
* FSDP × TP: ``parallelize_module`` column-wise (``Shard(0)``) and row-wise (``Shard(1)``) over
  ``tensor_parallel``, ``fully_shard`` over ``data_parallel``, a third hidden layer FSDP only: two
  layout groups (all 4 ranks; the 2 data-parallel ranks), one all-reduce each per measured step
  and none on the others (counted around torch.distributed's collectives);
* the QK-norm transformer example (``tests.lightning.test_qknorm.QKNormNet``, AdamW) under FSDP × TP, heads
  split across the tensor-parallel ranks: exactly the q and k projections are tracked.

Every ``smd/*`` series is compared, the per-unit ``smd/channel/*`` ones included (each rank adds
its local rows into their global units; see ``lightning_smd.core.shards``). The 1-vs-N equality
model is ``tests.setups_common.TinyNet`` with GroupNorm (4 units per hidden weight; per-sample
like LayerNorm, contiguous batch halves: the data-parallel gradient is the full-batch gradient up
to float reassociation).
"""

from __future__ import annotations

import json

import pytest

from tests.setups_common import launch, metrics_of, run_setup, smd_series
from tests.lightning.test_training_setups import assert_same_series

STEPS = 12
DROP = 8  # MultiStepLR ×0.1 at this step, rescaled by (1/10)^(1/4) (SGDM; AdamW: (1/10)^(1/2))
REL = 1e-4  # the bar; the runs agree to ~1e-6
RESCALE = {"milestones": [DROP]}
QKNORM = "tests.lightning.test_qknorm:QKNormNet"


def _setup(name, layout, devices, hidden=2, every=1, count=False):
    # GroupNorm (4 groups of 4 rows): each rank's shard holds whole units (FSDP2, HSDP), some rows of
    # strided blocks (FSDP over column-wise TP) or part of every row (row-wise TP); the smd/channel/*
    # series must equal one process's all the same
    return {"name": name, "strategy": layout, "devices": devices, "steps": STEPS, "count_collectives": count,
            "model_kwargs": {**RESCALE, "hidden_layers": hidden, "norm": "group"},
            "callback_kwargs": {"rescale": True, "log_every_n_steps": every}}


TWO = [_setup("fsdp2-default-mesh", "fsdp2_default_mesh", 2, count=True)]
FOUR = [
    _setup("hsdp", "hsdp", 4),
    # every other step measured: the collective count sees unmeasured steps too
    _setup("fsdp2-tp", "fsdp2_tp", 4, hidden=3, every=2, count=True),
    {**_setup("qknorm-fsdp2-tp", "fsdp2_tp", 4), "module_cls": QKNORM, "model_kwargs": RESCALE},
]
REFERENCE = {"fsdp2-default-mesh": "hidden2", "hsdp": "hidden2", "fsdp2-tp": "hidden3-every2",
             "qknorm-fsdp2-tp": "qknorm"}
QK = [f"model.blocks.{i}.attn.{p}_proj.weight" for i in range(2) for p in ("k", "q")]
TRACKED = {"hidden2": ["net.0.weight", "net.3.weight"], "hidden3-every2": ["net.0.weight", "net.3.weight", "net.6.weight"],
           "qknorm": QK}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    runs = {"hidden2": {"hidden_layers": 2, "norm": "group"}, "hidden3-every2": {"hidden_layers": 3, "norm": "group"},
            "qknorm": {}}
    for name, kw in runs.items():
        every = 2 if name.endswith("every2") else 1
        run_setup(root, name, steps=STEPS, model_kwargs={**RESCALE, **kw}, module_cls=QKNORM if name == "qknorm" else None,
                  callback_kwargs={"rescale": True, "log_every_n_steps": every})
    return {name: metrics_of(root, name) for name in runs}


def _run(root, world, setups):
    launch(world, setups, root, timeout=400)
    metrics = {s["name"]: metrics_of(root, s["name"]) for s in setups}
    ranks = {s["name"]: [json.loads((root / f"{s['name']}.rank{r}.json").read_text()) for r in range(world)]
             for s in setups}
    return metrics, ranks


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("two"), 2, TWO)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("four"), 4, FOUR)


def _check_equal(runs, single, setup):
    metrics, ranks = runs
    want = TRACKED[REFERENCE[setup]]
    assert all(r["candidates"] == want for r in ranks[setup]), [r["candidates"] for r in ranks[setup]]
    # a unit's ‖w*‖ comes from its running L, a sum of a few samples h_t‖w‖² of either sign (h_t =
    # ‖g‖² + 2α⟨v, g⟩ cancels): on a 4-row unit it can sit near 0, where float reassociation (TP's
    # matmuls add in another order) shows at ~2e-4 (net.0's smallest unit, FSDP × TP, the step after
    # the rescale; every other series agrees to ~1e-6)
    split = lambda m, keep: {k: v for k, v in m.items() if k.startswith("smd/channel/weight_norm_theory/") == keep}  # noqa: E731
    got, ref = metrics[setup], single[REFERENCE[setup]]
    assert sorted(smd_series(got)) == sorted(smd_series(ref)), setup
    assert any(k.startswith("smd/channel/") for k in got), "per-unit statistics under sharding"
    assert_same_series(split(got, False), split(ref, False), rel=REL, what=setup)
    assert_same_series(split(got, True), split(ref, True), rel=1e-3, what=setup)
    # the rescale happened, on every rank's shards (the series after step 8 would differ otherwise)
    # TinyNet (SGD with momentum): k^(-1/4); the QK-norm transformer (AdamW): its own k^(-1/2)
    exponent = 0.5 if REFERENCE[setup] == "qknorm" else 0.25
    assert metrics[setup]["smd/rescale_factor"] == pytest.approx({DROP: 0.1**exponent})
    after = smd_series(metrics[setup])[f"smd/angular_update/{want[0]}"]
    assert max(after) == STEPS - 1 and min(after) < DROP


@pytest.mark.slow
def test_fsdp2_without_mesh_equals_single_process(two, single):
    """PyTorch's FSDP2 tutorial: ``fully_shard(layer)`` then ``fully_shard(model)``, no ``mesh=``."""
    _check_equal(two, single, "fsdp2-default-mesh")


@pytest.mark.slow
def test_hsdp_equals_single_process(four, single):
    """Replicate × shard: summed over the shard dimension only (over all 4 ranks would double every sum)."""
    _check_equal(four, single, "hsdp")


@pytest.mark.slow
def test_fsdp2_tensor_parallel_equals_single_process(four, single):
    """Column-wise and row-wise TP under FSDP, plus an FSDP-only layer: mixed placements and meshes."""
    _check_equal(four, single, "fsdp2-tp")


@pytest.mark.slow
def test_qknorm_transformer_fsdp2_tp_equals_single_process(four, single):
    """AdamW on the QK-norm transformer, q/k/v column-wise (2 of 4 heads per rank), o row-wise, the
    q/k norms SequenceParallel over the heads, FSDP over data_parallel: only q and k are tracked,
    on every rank, and every series equals one process."""
    _check_equal(four, single, "qknorm-fsdp2-tp")


@pytest.mark.slow
def test_qknorm_tensor_parallel_found_by_the_structural_rule(four):
    """The recorder's pre-hooks run first (prepend): SequenceParallel's DTensor input does not hide the norm."""
    _, ranks = four
    reasons = ranks["qknorm-fsdp2-tp"][0]["reasons"]
    assert all(r.startswith("Linear → RMSNorm") for r in reasons.values()), reasons


def _after_detection(calls):
    """The calls after detection's broadcast of the chosen tensors (the measured phase)."""
    end = max(i for i, c in enumerate(calls) if c[1] == "broadcast_object_list")
    return calls[end + 1:], calls[end][0]


@pytest.mark.slow
def test_one_all_reduce_per_layout_group_per_measured_step(two, four):
    """Measured steps: one all-reduce per layout group, in the same order on every rank, the per-unit
    sums included (each tensor and its 4 units); unmeasured steps (and the rescale at the LR drop): no
    collective at all."""
    # FSDP × TP, measured every other step: group 1 = net.0 (col-wise) + net.3 (row-wise), sharded over
    # both mesh dimensions (all 4 ranks); group 2 = net.6, sharded over data_parallel only
    _, ranks = four
    sequences = []
    for info in ranks["fsdp2-tp"]:
        rank = info["rank"]
        measured, detected_at = _after_detection([tuple(c) for c in info["collectives"]])
        dp_peers = [r for r in range(4) if r % 2 == rank % 2]  # mesh (data_parallel=2, tensor_parallel=2)
        per_step = [("all_reduce", [0, 1, 2, 3], 2 + 2 * 4), ("all_reduce", dp_peers, 1 + 4)]
        steps = sorted({c[0] for c in measured})
        assert steps == [s for s in range(detected_at + 1, STEPS) if (s + 1) % 2 == 0], steps
        for step in steps:
            assert [c[1:] for c in measured if c[0] == step] == per_step, (rank, step)
        sequences.append([(c[0], c[1], c[3]) for c in info["collectives"]])
    assert all(s == sequences[0] for s in sequences)  # same collectives, same order, every rank
    # FSDP2 (default meshes), every step measured: one all-reduce of all tracked tensors per step
    _, ranks = two
    for info in ranks["fsdp2-default-mesh"]:
        measured, detected_at = _after_detection([tuple(c) for c in info["collectives"]])
        assert [c[1:] for c in measured] == [("all_reduce", [0, 1], 2 + 2 * 4)] * (STEPS - 1 - detected_at)


# ------------------------------------------------------------------ in process: layout grouping
@pytest.fixture
def fake_world():
    """A 4-rank world in this process (torch's "fake" backend: collectives return at once), seen
    from rank 1 of a (data_parallel=2, tensor_parallel=2) mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("fake", rank=1, world_size=4, store=FakeStore())
    try:
        yield init_device_mesh("cpu", (2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    finally:
        dist.destroy_process_group()


def test_layout_groups_and_one_collective_each(fake_world, monkeypatch):
    """FSDP × TP placements (``_StridedShard`` is not a ``Shard`` and its ``is_shard()`` is False),
    an FSDP-only tensor, a replicated DTensor and a plain tensor: two groups, reduced once each in
    the order of their first column, results scattered back to their columns."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from lightning_smd.core.distributed import LayoutReduce

    mesh = fake_world
    col = DTensor.from_local(torch.ones(2, 4), mesh, [_StridedShard(0, split_factor=2), Shard(0)], run_check=False)
    row = DTensor.from_local(torch.ones(4, 2), mesh, [Shard(0), Shard(1)], run_check=False)
    fsdp_only = DTensor.from_local(torch.ones(2, 4), mesh["data_parallel"], [Shard(0)], run_check=False)
    replicated = DTensor.from_local(torch.ones(4), mesh, [Replicate(), Replicate()], run_check=False)
    reduce = LayoutReduce([col, fsdp_only, row, replicated, torch.ones(3)])
    assert [(g.key, g.columns) for g in reduce.groups] == [((0, 1, 2, 3), [0, 2]), ((1, 3), [1])]
    assert reduce.collectives_per_call == 2

    calls = []

    def all_reduce(tensor, op=None, group=None, **kw):  # stands for the sum: ×10 over 4 ranks, ×100 over 2
        # gloo (and NCCL) reduce the first numel elements of a strided view's storage, not the view
        assert tensor.is_contiguous(), "a collective was given a strided view"
        ranks = dist.get_process_group_ranks(group)
        calls.append((tuple(tensor.shape), ranks))
        tensor.mul_(10 if len(ranks) == 4 else 100)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    out = reduce(torch.ones(5, 5))
    assert calls == [((5, 2), [0, 1, 2, 3]), ((5, 1), [1, 3])]
    assert out[0].tolist() == [10.0, 100.0, 10.0, 1.0, 1.0]  # replicated and plain columns: untouched
    with pytest.raises(RuntimeError, match="partial sums of 3 tensors.*5 tracked tensors in 2 layouts"):
        reduce(torch.ones(5, 3))
    # one layout (FSDP2 / HSDP): in place, whatever the number of columns (detection skips gradless tensors)
    single = LayoutReduce([row, col])
    calls.clear()
    assert single(torch.ones(3, 1)).tolist() == [[10.0]] * 3 and calls == [((3, 1), [0, 1, 2, 3])]
    # a column slice of a wider buffer (the measurer's stacked sums, with a scratch column): the
    # returned tensor holds the sums; before, gloo summed the wrong elements (FSDP2 != one process)
    calls.clear()
    wide = torch.arange(15.0).reshape(5, 3)
    assert single(wide[:, :2]).tolist() == (wide[:, :2] * 10).tolist() and calls == [((5, 2), [0, 1, 2, 3])]


def test_local_rows_and_unit_columns_of_each_placement(fake_world, monkeypatch):
    """Per-unit statistics under sharding: the global rows (hence units) a rank's local part holds,
    as torch places them (FSDP over column-wise TP is a ``_StridedShard``: non-adjacent blocks), and
    each tensor's unit columns reduced with its own layout group."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    from lightning_smd.core.measure import _row_blocks
    from lightning_smd.core.shards import local_rows, unit_of_local_rows
    from lightning_smd.core.distributed import LayoutReduce

    mesh = fake_world  # rank 1: coordinate (data_parallel 0, tensor_parallel 1)
    col = DTensor.from_local(torch.ones(2, 4), mesh, [_StridedShard(0, split_factor=2), Shard(0)], run_check=False)
    row = DTensor.from_local(torch.ones(8, 2), mesh, [Shard(1), Shard(1)], run_check=False)
    fsdp = DTensor.from_local(torch.ones(3, 4), mesh["data_parallel"], [Shard(0)], run_check=False)
    hsdp = DTensor.from_local(torch.ones(4, 4), mesh, [Replicate(), Shard(0)], run_check=False)
    assert local_rows(col) == [4, 5]  # tensor-parallel rank 1 holds rows 4-7, data-parallel rank 0 their first half
    assert local_rows(col)[0] == compute_local_shape_and_global_offset(col.shape, mesh, col.placements)[1][0]
    assert local_rows(row) == list(range(8))  # split along dim 1: every row, part of its elements
    assert local_rows(fsdp) == [0, 1, 2] and local_rows(hsdp) == [4, 5, 6, 7]
    assert local_rows(torch.ones(3, 2)) is None
    assert unit_of_local_rows(col, 4) == [2, 2] and unit_of_local_rows(hsdp, 2) == [1, 1, 1, 1]
    assert unit_of_local_rows(row, 8) == list(range(8)) and unit_of_local_rows(fsdp, 1) == [0, 0, 0]
    assert [_row_blocks(r) for r in ([2, 2], [1, 1, 1, 1], [0, 0, 1, 1, 1, 1], list(range(8)), [])] == [1, 1, 3, 8, 1]

    calls = []

    def all_reduce(tensor, op=None, group=None, **kw):
        calls.append((tuple(tensor.shape), dist.get_process_group_ranks(group)))
        tensor.mul_(10 if len(calls[-1][1]) == 4 else 100)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    reduce = LayoutReduce([col, fsdp, row, torch.ones(3)], units=[4, 3, 8, 1])
    out = reduce(torch.ones(2, 4 + 16))  # tensor columns, then 4 + 3 + 8 + 1 unit columns
    assert calls == [((2, 14), [0, 1, 2, 3]), ((2, 4), [1, 3])]
    assert out[0].tolist() == [10, 100, 10, 1] + [10] * 4 + [100] * 3 + [10] * 8 + [1]
    assert reduce(torch.ones(2, 4))[0].tolist() == [10, 100, 10, 1]  # a step without per-unit statistics
