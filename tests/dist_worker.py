"""One rank of a multi-process test run (started by ``tests.setups_common.launch``).

Runs every setup of the JSON spec in turn, in this process, with the process group that the
first fit creates; writes ``{out}/{name}.rank{r}.json`` with what the callback saw on this rank.
A setup with ``"crash_at": N`` raises from a callback at step N (a simulated fault) and saves
checkpoints every ``ckpt_every`` steps; ``"resume": "<name>"`` resumes from that run's last one.
A setup with ``"count_collectives": true`` records every collective that lightning_smd issues
(:class:`CollectiveCounter`); ``"module_cls": "pkg.mod:Class"`` trains another LightningModule.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import pytorch_lightning as pl


class Crash(RuntimeError):
    pass


class CrashAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Crash(f"simulated fault at step {self.step}")


_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
                "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


class CollectiveCounter(pl.Callback):
    """Wraps torch.distributed's collectives for one fit and records those called from lightning_smd
    (any frame of the call stack in the package): ``(batch, op, ranks of the group, columns)``.

    ``batch`` is the fit's batch counter at the call (``_batches_that_stepped`` at batch start:
    the step the measurement is logged at); Lightning's and FSDP's own collectives are not counted.
    """

    def __init__(self) -> None:
        import lightning_smd

        self.package = str(Path(lightning_smd.__file__).resolve().parent)
        self.calls: list[tuple[int, str, list[int], int]] = []
        self.batch = -1
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str, fn):
        import torch.distributed as dist

        def wrapped(*args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None and not frame.f_code.co_filename.startswith(self.package):
                frame = frame.f_back
            if frame is not None:
                group = kwargs.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                tensor = args[0] if args else kwargs.get("tensor")
                columns = int(tensor.shape[-1]) if hasattr(tensor, "shape") and tensor.dim() else 0
                self.calls.append((self.batch, name, sorted(ranks), columns))
            return fn(*args, **kwargs)

        return wrapped

    def setup(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name in _COLLECTIVES:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))

    def teardown(self, trainer, pl_module, stage):
        import torch.distributed as dist

        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = trainer.fit_loop.epoch_loop._batches_that_stepped


def main() -> None:
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tests.setups_common import run_setup

    spec, out = Path(sys.argv[1]), Path(sys.argv[2])
    # a hung collective shows up as stack traces in the rank logs, not as a silent timeout
    faulthandler.dump_traceback_later(float(os.environ.get("SMD_WORKER_TIMEOUT", "110")), exit=True)
    for setup in json.loads(spec.read_text()):
        setup = dict(setup)
        name = setup.pop("name")
        devices = setup.get("devices", 1)
        os.environ["LOCAL_RANK"] = str(int(os.environ["RANK"]) % devices)
        os.environ["NODE_RANK"] = str(int(os.environ["RANK"]) // devices)
        callbacks = []
        crash_at = setup.pop("crash_at", None)
        every = setup.pop("ckpt_every", None)
        if every:
            callbacks.append(ModelCheckpoint(dirpath=out / f"{name}-ckpt", every_n_train_steps=every, save_top_k=-1))
            setup["enable_checkpointing"] = True
        if crash_at is not None:
            callbacks.append(CrashAt(crash_at))
        counter = CollectiveCounter() if setup.pop("count_collectives", False) else None
        if counter is not None:
            callbacks.append(counter)
        if resume := setup.pop("resume", None):
            ckpts = sorted((out / f"{resume}-ckpt").glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[1]))
            setup["ckpt_path"] = str(ckpts[-1])
        trainer = None
        try:
            trainer, cb = run_setup(out, name, callbacks=callbacks, **setup)
        except Crash:
            cb = None
        info = {"rank": pl.utilities.rank_zero.rank_zero_only.rank}
        if cb is not None:
            info.update(candidates=sorted(cb.candidates), records=len(cb.records), skipped=getattr(cb, "skipped_steps", 0),
                        global_step=trainer.global_step,
                        reasons={n: str(getattr(c, "reason", "")) for n, c in cb.candidates.items()})
        if counter is not None:
            info["collectives"] = counter.calls
        (out / f"{name}.rank{info['rank']}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
