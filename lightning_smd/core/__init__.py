"""The engine, torch only (importable without Lightning).

:class:`~lightning_smd.core.engine.SMDEngine` (the operations the adapters call, each with a
:class:`~lightning_smd.core.loop.LoopView` of their loop) and the parts it owns: the detection
session, the tracked set, the schedule watcher, the metrics builder, the labelled step result
(``result``). Their tools: Detection (``detect``), measurement of one optimizer step (``measure``), invariance units
(``units``), the formulas (``theory``), the running estimates (``estimates``), equilibrium tracking
(``equilibrium``), the rescale maths and policy (``rescale``), per-channel metrics (``channels``),
the plan of a fit's LR stages (``plan``), and everything a checkpoint keeps in one object
(``state``: :class:`~lightning_smd.core.state.SMDState`).
"""
