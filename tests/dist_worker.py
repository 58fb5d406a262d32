"""One rank of a multi-process test run (started by ``tests.setups_common.launch``).

Runs every setup of the JSON spec in turn, in this process, with the process group that the
first fit creates; writes ``{out}/{name}.rank{r}.json`` with what the callback saw on this rank.
A setup with ``"crash_at": N`` raises from a callback at step N (a simulated fault) and saves
checkpoints every ``ckpt_every`` steps; ``"resume": "<name>"`` resumes from that run's last one.
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
                        global_step=trainer.global_step)
        (out / f"{name}.rank{info['rank']}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main()
