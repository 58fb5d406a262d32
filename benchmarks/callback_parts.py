"""Where the callback's self time goes per measured step in a real fit of the tensor-count model.

    python benchmarks/callback_parts.py 3000 sgdm 14     # tensors, optimizer, steps (measuring every step)

Wraps the callback's hooks and the metrics/channel builders with CPU-time (time.process_time)
accumulators and prints the median over the last 6 steps of each. Run it from two checkouts
back to back (PYTHONPATH set to each) to compare revisions on the same machine state.
"""
import sys, time, warnings, logging, statistics
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
warnings.filterwarnings("ignore")
for n in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
    logging.getLogger(n).setLevel(logging.ERROR)
import torch
torch.set_num_threads(1)
import pytorch_lightning as pl
from tensor_count import BlocksModule
from overhead import BenchSMDCallback, MemoryLogger, pin_malloc
pin_malloc()
import lightning_smd.core.metrics as M, lightning_smd.core.channels as C, lightning_smd.lightning.publish as P
import lightning_smd.core.schedule as S, lightning_smd.core.engine as E, lightning_smd.core.result as R, lightning_smd.core.steps as ST, lightning_smd.lightning.callback as CB
import lightning_smd.core.measure as ME
clock = time.process_time
acc = {}
def wrap(cls, name, label=None):
    f = getattr(cls, name)
    label = label or f"{cls.__name__}.{name}"
    def g(*a, **k):
        t = clock()
        try:
            return f(*a, **k)
        finally:
            acc.setdefault(label, []).append(clock() - t)
    setattr(cls, name, g)
for cls, name in [(M.MetricsBuilder, "build"), (C.ChannelMetrics, "build"), (P.Publisher, "log"), (S.ScheduleWatcher if hasattr(S, "ScheduleWatcher") else None, "observe"),
                  (CB.SMDCallback, "on_train_batch_end"), (CB.SMDCallback, "on_train_batch_start"), (CB.SMDCallback, "_before_step"), (CB.SMDCallback, "_after_step"),
                  (CB.SMDCallback, "on_before_optimizer_step"), (E.SMDEngine, "batch_end"), (R.Labeller, "label"),
                  (ME.StepMeasurer, "before_step"), (ME.StepMeasurer, "after_step"), (ME.StepMeasurer, "_layout"), (ME, "row_sums"), (C, "segment_percentiles")]:
    if cls is not None and hasattr(cls, name):
        wrap(cls, name, f"{getattr(cls, '__name__', '')}.{name}")
count, opt = int(sys.argv[1]), sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 14
cb = BenchSMDCallback(verbose=False, log_every_n_steps=1)
tr = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=MemoryLogger(), callbacks=[cb], log_every_n_steps=1,
                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                limit_val_batches=0, max_epochs=-1)
tr.fit(BlocksModule(count, opt))
for k, v in acc.items():
    v = v[-6:]
    print(f"{k:45s} n={len(v):3d} median {1e3*statistics.median(v):8.2f} ms")
