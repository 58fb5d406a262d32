"""The hot path: no host synchronization between logging steps, one device→host transfer per measured step.

A real ``Trainer.fit`` runs under a :class:`~torch.overrides.TorchFunctionMode` that records every
call that would synchronize a GPU with the host (``.item()``, ``.cpu()``, ``.tolist()``,
``.numpy()``, ``float(t)``, ``bool(t)``, ``.to("cpu")`` ...) made from code of the ``lightning_smd``
package (found by walking the Python stack). On CPU every tensor is on the host already, so a
*transfer* is a sync call on a tensor that is not derived from an earlier transferred one: the
tensors computed from a transferred tensor are tracked through every torch call (taint).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import lightning_smd
from lightning_smd import SMDCallback

from tests.helpers import fit
from tests.models import DigitsCNN

_PKG = Path(lightning_smd.__file__).parent
PACKAGE_DIRS = tuple({str(_PKG) + "/", str(_PKG.resolve()) + "/", str(_PKG.absolute()) + "/"})
SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__",
                "__array__", "__format__"}


def _to_host(args, kwargs) -> bool:
    """``Tensor.to(...)`` whose target device is the CPU (a transfer when the tensor is a device tensor)."""
    for a in list(args[1:]) + list(kwargs.values()):
        if isinstance(a, torch.device) and a.type == "cpu":
            return True
        if isinstance(a, str) and a.split(":")[0] == "cpu":
            return True
    return False


def _to_device(args, kwargs) -> bool:
    """``Tensor.to(...)`` naming a device."""
    return any(isinstance(a, (torch.device, str)) for a in list(args[1:]) + list(kwargs.values()))


def _smd_caller() -> str | None:
    """``file:line`` of the innermost lightning_smd frame on the stack, if any."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(PACKAGE_DIRS):
            if frame.f_code.co_name == "closure_then_before":
                return None  # the training closure (forward, backward) that the step hook runs first
            return f"{Path(filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return None


class HostSyncRecorder(TorchFunctionMode):
    """Records sync calls made from lightning_smd code, per step, and which of them are transfers.

    Host tensors (taint) are tracked by storage, so views (indexing, iteration) of a host tensor are
    host tensors too; outputs of any torch call with a host input are host tensors, and so are
    tensors built from Python data (``torch.tensor``). They are kept alive until the step ends, so
    no storage address is reused within a step.
    """

    HOST_BORN = {"tensor", "as_tensor", "from_numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.events: dict[int, list[dict]] = {}
        self._host_ptrs: set[int] = set()
        self._keep: list[torch.Tensor] = []

    def new_step(self, step: int | None) -> None:
        self.step = step
        self._host_ptrs.clear()
        self._keep.clear()

    @staticmethod
    def _ptr(t: torch.Tensor) -> int | None:
        try:
            return t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None

    def _is_host(self, t: torch.Tensor) -> bool:
        return self._ptr(t) in self._host_ptrs

    def _mark_host(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (ptr := self._ptr(t)) is not None:
                self._host_ptrs.add(ptr)
                self._keep.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.step is None:
            return out
        name = getattr(func, "__name__", "")
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        host_input = bool(self._host_ptrs) and any(self._is_host(t) for t in tensors)
        if name == "to" and host_input and _to_device(args, kwargs):
            # a host tensor moved to the compute device (on CPU the same storage): a device tensor now
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    self._host_ptrs.discard(self._ptr(t))
            return out
        if name in SYNC_METHODS or (name == "to" and _to_host(args, kwargs)):
            caller = _smd_caller()
            if caller is not None:
                source = args[0] if args and isinstance(args[0], torch.Tensor) else None
                self.events.setdefault(self.step, []).append({
                    "call": name, "caller": caller, "transfer": not host_input,
                    "shape": tuple(source.shape) if source is not None else None,
                })
            if args and isinstance(args[0], torch.Tensor):
                self._mark_host(args[0])  # on CPU, .cpu() returns the tensor itself
            self._mark_host(out)
        elif host_input or name in self.HOST_BORN:
            self._mark_host(out)
        return out


class _StepStart(pl.Callback):
    """First callback: marks the step and whether detection had finished before it."""

    def __init__(self, recorder: HostSyncRecorder, smd: SMDCallback) -> None:
        self.recorder, self.smd = recorder, smd
        self.detected_before: dict[int, bool] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        self.detected_before[step] = self.smd._measurer is not None
        self.recorder.new_step(step)
        self.recorder.__enter__()


class _StepEnd(pl.Callback):
    """Last callback: closes the step after every other on_train_batch_end."""

    def __init__(self, recorder: HostSyncRecorder) -> None:
        self.recorder = recorder

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.recorder.__exit__(None, None, None)
        self.recorder.new_step(None)


def _run(tmp_path, optimizer: str, every: int = 4, max_steps: int = 14):
    torch.manual_seed(0)
    recorder = HostSyncRecorder()
    smd = SMDCallback(log_every_n_steps=every, verbose=False, figures_dir=str(tmp_path / "fig"))
    start = _StepStart(recorder, smd)
    fit(DigitsCNN(optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3),
        tmp_path, [start, smd, _StepEnd(recorder)], max_steps=max_steps, log_every_n_steps=every)
    return recorder, start, smd


def test_no_host_sync_between_logging_steps_and_one_transfer_per_measured_step(tmp_path):
    every = 4
    for optimizer in ("sgd", "adamw"):  # buffer mode and adam mode (no weight copy either)
        recorder, start, smd = _run(tmp_path / optimizer, optimizer, every)
        after_detection = [s for s, done in start.detected_before.items() if done]
        measured = [s for s in after_detection if (s + 1) % every == 0]
        unmeasured = [s for s in after_detection if (s + 1) % every != 0]
        assert len(measured) >= 2 and len(unmeasured) >= 6, (measured, unmeasured)
        assert [step for step, _ in smd.records] == measured

        for s in unmeasured:
            assert recorder.events.get(s, []) == [], f"{optimizer}: host sync on unmeasured step {s}: {recorder.events[s]}"
        n_tracked = len(smd.candidates)
        assert n_tracked == 3  # the three convs of DigitsCNN
        for s in measured:
            transfers = [e for e in recorder.events.get(s, []) if e["transfer"]]
            assert len(transfers) == 1, f"{optimizer}: step {s} transfers: {transfers}"
            # per-channel statistics on every measured step (the default): the unit columns come in the same transfer
            n_units = sum(u.count for u in smd.units.values())
            assert transfers[0]["call"] in ("cpu", "tolist", "to") and transfers[0]["shape"] == (3, n_tracked + n_units), transfers


def test_recorder_sees_syncs_from_lightning_smd_frames():
    """Positive control: the recorder does catch a sync made inside lightning_smd code."""
    from lightning_smd.core.measure import angular_update

    recorder = HostSyncRecorder()
    recorder.new_step(0)
    w = torch.randn(16)
    with recorder:
        angle = angular_update(w, w + 0.01)  # no sync inside
        float(angle)  # from this file: not attributed to lightning_smd
    assert recorder.events.get(0, []) == []
    with recorder:
        # a sync whose caller is a lightning_smd frame: theory code converting a tensor argument
        from lightning_smd.core import measure

        code = compile("float(x.sum())", measure.__file__, "eval")
        eval(code, {"x": w})
    assert [e["call"] for e in recorder.events[0]] == ["__float__"]


def test_unit_grad_false_skips_gradient_statistics_only():
    """``before_step(unit_grad=False)`` (no read at all before the step in buffer mode): Δ_t and ‖w_t‖ unchanged,
    the unit-gradient row NaN (which RunningMean skips)."""
    from lightning_smd.core.measure import GroupSlice, StepMeasurer, measurement_mode

    results = {}
    for unit_grad in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(288, 4))
        for name, make in (("sgdm", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4)),
                           ("adamw", lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05))):
            opt = make(model.parameters())
            conv = model[0].weight
            measurer = StepMeasurer([GroupSlice(opt, 0, [conv], 0, measurement_mode(opt, opt.param_groups[0]))])
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                opt.zero_grad()
                model(torch.randn(4, 3, 8, 8, generator=gen)).square().mean().backward()
                measurer.before_step(unit_grad=unit_grad)
                opt.step()
                stats, _ = measurer.after_step()
            results[unit_grad, name] = stats
    for name in ("sgdm", "adamw"):
        assert torch.equal(results[True, name][:2], results[False, name][:2])
        assert torch.isfinite(results[True, name][2]).all() and torch.isnan(results[False, name][2]).all()
