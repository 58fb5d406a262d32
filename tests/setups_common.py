"""Shared pieces of the training-setup tests: a tiny normalized model whose data-parallel runs are
exactly equal to a single-process run on the same global batch, a runner for one *setup*
(strategy × precision × accumulation × optimization style), and a launcher of real
multi-process runs (``tests/dist_worker.py``, started like ``torchrun`` would: one process per
rank with ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` set, so Lightning
sees externally created processes and does not relaunch ``sys.argv``).

Why the model gives *exact* 1-vs-N equality: every normalization is per sample (LayerNorm), the
loss is a mean over the batch, and each rank's batch is a contiguous half of the single-process
batch, so the averaged data-parallel gradient is the full-batch gradient (up to float
reassociation). BatchNorm would need SyncBatchNorm for that (see ``test_strategies``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 16
DIM = 8


def dataset(steps: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    n = steps * GLOBAL_BATCH
    x = torch.randn(n, DIM, generator=gen)
    y = torch.randint(0, 4, (n,), generator=gen)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """Linear → LayerNorm → ReLU → Linear → LayerNorm → ReLU → Linear: the two hidden weights are
    scale-invariant, the classifier is not.

    Args:
        optimizer: ``"sgdm"`` (two param groups with different lr/wd, heavy-ball: the "buffer"
            measurement), ``"sgd"`` (no momentum: the "grad" measurement) or ``"adamw"`` (snapshot).
        steps: optimizer steps of data to serve (global batch 16).
        accumulate: the Trainer's ``accumulate_grad_batches`` (the per-batch size shrinks so one
            optimizer step always sees the same 16 samples).
        fsdp2: shard the layers with ``fully_shard`` in ``configure_model`` (ModelParallelStrategy).
        layout: how ``configure_model`` shards under ``ModelParallelStrategy`` (see :data:`LAYOUTS`);
            ``fsdp2=True`` is ``layout="fsdp2"``. Without a process group the layout is ignored, so
            the same module is the single-process reference.
        hidden_layers: Linear → LayerNorm → ReLU blocks (2: ``net.0``, ``net.3``; 3 adds ``net.6``).
        norm: ``"layer"`` (LayerNorm over all 16 features: each hidden weight is one invariance unit)
            or ``"group"`` (GroupNorm, 4 groups: 4 units of 4 rows each, per sample like LayerNorm).
        compile: ``torch.compile`` the network (backend ``aot_eager``: a real Dynamo/AOT trace, fast).
        milestones: LR drops (MultiStepLR ×0.1, step interval).
    """

    def __init__(self, optimizer: str = "sgdm", steps: int = 12, accumulate: int = 1, fsdp2: bool = False,
                 compile: bool = False, milestones: tuple[int, ...] = (), fused: bool = False,
                 step_indexed: bool = False, layout: str | None = None, hidden_layers: int = 2,
                 norm: str = "layer") -> None:
        super().__init__()
        torch.manual_seed(0)
        blocks = []
        for i in range(hidden_layers):
            blocks += [nn.Linear(DIM if i == 0 else 16, 16, bias=False),
                       nn.GroupNorm(4, 16) if norm == "group" else nn.LayerNorm(16), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(16, 4))
        self.hidden_names = tuple(f"{3 * i}.weight" for i in range(hidden_layers))
        self.optimizer, self.steps, self.accumulate = optimizer, steps, accumulate
        self.layout = layout or ("fsdp2" if fsdp2 else None)
        self.fsdp2, self.milestones, self.fused, self.step_indexed = fsdp2, list(milestones), fused, step_indexed
        if compile:
            self.net = torch.compile(self.net, backend="aot_eager")

    def configure_model(self) -> None:
        if not self.layout or not torch.distributed.is_initialized():
            return
        shard_layouts(self, self.layout)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.step_indexed:  # the data of step t whatever the loader did (a resumed run restarts it)
            x, y = (t[self.global_step] for t in self._by_step)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        hidden = [p for n, p in self.named_parameters() if n.endswith(self.hidden_names)]
        rest = [p for n, p in self.named_parameters() if not n.endswith(self.hidden_names)]
        if self.optimizer == "adamw":
            opt = torch.optim.AdamW([{"params": hidden, "name": "hidden"}, {"params": rest, "weight_decay": 0.0}],
                                    lr=1e-2, weight_decay=0.1, fused=self.fused or None)
        else:
            momentum = 0.9 if self.optimizer == "sgdm" else 0.0
            opt = torch.optim.SGD([{"params": hidden, "name": "hidden"}, {"params": rest, "lr": 0.05, "weight_decay": 1e-3}],
                                  lr=0.2, momentum=momentum, weight_decay=5e-3, fused=self.fused or None)
        if not self.milestones:
            return opt
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, self.milestones, 0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        data = dataset(self.steps)
        rank, world = data_parallel_rank(self.trainer)
        per_rank = GLOBAL_BATCH // world
        # rank r's part of global batch i: a contiguous slice of the single-process batch i
        idx = [i * GLOBAL_BATCH + rank * per_rank + j for i in range(self.steps) for j in range(per_rank)]
        subset = TensorDataset(*(t[idx] for t in data.tensors))
        self._by_step = [t.reshape(self.steps, per_rank, *t.shape[1:]) for t in subset.tensors]
        return DataLoader(subset, batch_size=per_rank // self.accumulate, shuffle=False)


LAYOUTS = {  # layout -> (ModelParallelStrategy(data_parallel_size, tensor_parallel_size) of a world size)
    # FSDP2 as Lightning's docs write it: fully_shard(layer, mesh=device_mesh["data_parallel"]), then the root
    "fsdp2": lambda world: (world, 1),
    # FSDP2 as PyTorch's tutorial writes it: no mesh= (each call builds a new, equal default mesh)
    "fsdp2_default_mesh": lambda world: (world, 1),
    # HSDP: fully_shard(..., mesh=2-D (replicate, shard) mesh): replicas across dim 0, shards across dim 1
    "hsdp": lambda world: (world, 1),
    # FSDP x TP: net.0 column-wise (Shard(0)), net.3 row-wise (Shard(1)) over tensor_parallel, then
    # fully_shard over data_parallel; further hidden layers are FSDP only
    "fsdp2_tp": lambda world: (world // 2, 2),
}


def data_parallel_rank(trainer: pl.Trainer) -> tuple[int, int]:
    """(rank, size) of this process among the data-parallel replicas: tensor-parallel peers see the
    same batch; HSDP's replicate and shard dimensions both split the batch."""
    mesh = getattr(trainer.strategy, "_device_mesh", None)
    if mesh is None:
        return trainer.global_rank, trainer.world_size
    dp = mesh["data_parallel"]
    return dp.get_local_rank(), dp.size()


def shard_layouts(module: pl.LightningModule, layout: str) -> None:
    """``configure_model`` of :class:`TinyNet` under ``ModelParallelStrategy``, per layout."""
    from torch.distributed.fsdp import fully_shard

    net = getattr(module.net, "_orig_mod", module.net)
    linears = [layer for layer in net if isinstance(layer, nn.Linear)]
    if layout == "fsdp2":
        mesh = module.device_mesh["data_parallel"]
        for layer in linears:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.net, mesh=mesh)
    elif layout == "fsdp2_default_mesh":
        for layer in linears:
            fully_shard(layer)
        fully_shard(module.net)
    elif layout == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh

        world = torch.distributed.get_world_size()
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
        for layer in linears:
            fully_shard(layer, mesh=mesh)
        fully_shard(module.net, mesh=mesh)
    elif layout == "fsdp2_tp":
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        tp, dp = module.device_mesh["tensor_parallel"], module.device_mesh["data_parallel"]
        # column-wise: weight Shard(0), output gathered for the LayerNorm; row-wise: weight Shard(1),
        # the replicated input split locally, the output all-reduced
        parallelize_module(net, tp, {"0": ColwiseParallel(output_layouts=Replicate()),
                                     "3": RowwiseParallel(input_layouts=Replicate())})
        for layer in linears:
            fully_shard(layer, mesh=dp)
        fully_shard(module.net, mesh=dp)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {sorted(LAYOUTS)}")


def run_setup(root: Path, name: str, *, strategy: Any = "auto", devices: int = 1, num_nodes: int = 1,
              precision: str | None = None, accumulate: int = 1, steps: int = 12, callback_kwargs: dict | None = None,
              model_kwargs: dict | None = None, plugins: Any = None, ckpt_path: str | None = None,
              callbacks: list | None = None, max_steps: int | None = None, module_cls: type | None = None,
              **trainer_kwargs: Any):
    """One fit of :class:`TinyNet` with an :class:`SMDCallback`; returns ``(trainer, callback)``."""
    from pytorch_lightning.loggers import CSVLogger

    from lightning_smd import EstimateOptions, SMDCallback

    if strategy == "fsdp2":
        from pytorch_lightning.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=devices * num_nodes, tensor_parallel_size=1)
        model_kwargs = {**(model_kwargs or {}), "fsdp2": True}
    elif isinstance(strategy, str) and strategy in LAYOUTS:
        from pytorch_lightning.strategies import ModelParallelStrategy

        dp, tp = LAYOUTS[strategy](devices * num_nodes)
        model_kwargs = {**(model_kwargs or {}), "layout": strategy}
        strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp)
    if isinstance(module_cls, str):  # "package.module:Class" (from a JSON spec of tests.dist_worker)
        import importlib

        mod, _, cls = module_cls.partition(":")
        module_cls = getattr(importlib.import_module(mod), cls)
    # every step's unit gradient: the matrix compares every sample across setups
    cb = SMDCallback(**{"log_every_n_steps": 1, "estimates": EstimateOptions(unit_grad_every=1), "verbose": False,
                        **(callback_kwargs or {})})
    module = (module_cls or TinyNet)(steps=steps, accumulate=accumulate, **(model_kwargs or {}))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision,
        max_steps=max_steps or steps, accumulate_grad_batches=accumulate, logger=CSVLogger(root, name=name, version=0),
        callbacks=[cb, *(callbacks or [])], log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=trainer_kwargs.pop("enable_checkpointing", False), use_distributed_sampler=False,
        plugins=plugins, **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer, cb


def metrics_of(root: Path, name: str) -> dict[str, dict[int, float]]:
    class _T:  # read_metrics wants something with .logger.log_dir
        class logger:
            log_dir = str(Path(root) / name / "version_0")

    return read_metrics(_T)


def smd_series(metrics: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    return {k: v for k, v in metrics.items() if k.startswith("smd/")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, setups: list[dict], out: Path, timeout: float = 240) -> None:
    """Run ``setups`` (kwargs of :func:`run_setup`, with ``"name"``) in ``world_size`` real processes.

    A setup with ``num_nodes > 1`` runs as that many nodes of ``devices`` processes (the worker
    sets ``NODE_RANK``/``LOCAL_RANK`` per setup), the multi-node DDP layout.
    """
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "setups.json"
    spec.write_text(json.dumps(setups))
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "NODE_RANK": "0",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "SMD_WORKER_TIMEOUT": str(max(timeout - 10, 5))}
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, "-m", "tests.dist_worker", str(spec), str(out)],
                                       cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc, _ in procs):
        if time.monotonic() > deadline or any(proc.poll() for proc, _ in procs):
            break  # a rank failed: the others would wait forever in a collective
        time.sleep(0.2)
    for rank, (proc, log) in enumerate(procs):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            failed.append(f"rank {rank} killed (timed out or another rank failed)")
        elif proc.returncode:
            failed.append(f"rank {rank} exited with {proc.returncode}")
        log.close()
    if failed:
        logs = "\n".join(f"--- rank {r}\n" + (out / f"rank{r}.log").read_text()[-4000:] for r in range(world_size))
        raise AssertionError("; ".join(failed) + "\n" + logs)


# ------------------------------------------------------------------------- ground truth
class WeightRecorder(pl.Callback):
    """Keeps every parameter at the start of every batch (and at the end of fit), by clean name:
    the true Δ_t is the angle between consecutive copies, whatever the optimizer or precision."""

    def __init__(self) -> None:
        self.weights: list[tuple[int, dict[str, torch.Tensor]]] = []  # (log step, {name: w})

    def _keep(self, trainer, pl_module):
        from lightning_smd.core.detect import clean_name

        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.weights.append((step, {clean_name(n): p.detach().float().clone() for n, p in pl_module.named_parameters()}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._keep(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        self._keep(trainer, pl_module)

    def true_angles(self, name: str) -> dict[int, float]:
        """{log step t: ∠(w_t, w_{t+1})} over consecutive batches (one optimizer step each)."""
        out = {}
        for (step, before), (_, after) in zip(self.weights, self.weights[1:]):
            a, b = before[name].reshape(-1).double(), after[name].reshape(-1).double()
            a, b = a / a.norm(), b / b.norm()
            out[step] = float(2 * torch.atan2((a - b).norm(), (a + b).norm()))
        return out


# ------------------------------------------------------------------------- SyncBatchNorm on CPU
class CPUSyncBatchNorm(nn.BatchNorm1d):
    """A synchronized BatchNorm that runs on CPU (torch's SyncBatchNorm, and DDP around it, refuse
    CPU): the global mean and variance of the batch across ranks, autograd through the all-reduce."""

    def forward(self, x):
        import torch.distributed as dist
        from torch.distributed.nn.functional import all_reduce

        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = all_reduce(stats)
        c = x.shape[1]
        n = stats[-1]
        mean, sq = stats[:c] / n, stats[c:2 * c] / n
        var = sq - mean * mean
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape)


class CPUSyncBN(TorchSyncBatchNorm):
    """``Trainer(sync_batchnorm=True)``'s replacement of every BatchNorm by SyncBatchNorm in
    ``strategy.setup`` (Lightning's own conversion), switched to the CPU-capable class."""

    def apply(self, model):
        converted = super().apply(model)
        for module in converted.modules():
            if type(module) is nn.SyncBatchNorm:
                module.__class__ = CPUSyncBatchNorm  # same parameters and buffers, CPU-capable forward
        return converted


class TinyBNNet(pl.LightningModule):
    """Linear → BatchNorm1d → ReLU → Linear, SGD with momentum; BN couples the samples of a batch,
    so 1-vs-N equality needs synchronized batch statistics."""

    def __init__(self, steps: int = 10, **unused: Any) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
        self.steps = steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-3)

    def train_dataloader(self):
        return TinyNet.train_dataloader(self)

    accumulate = 1
