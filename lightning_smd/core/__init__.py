"""The engine, torch only (importable without Lightning).

Detection (``detect``), measurement of one optimizer step (``measure``), invariance units
(``units``), the formulas (``theory``), the running estimates (``estimates``), equilibrium tracking
(``equilibrium``), the rescale maths and policy (``rescale``), per-channel metrics (``channels``),
the plan of a fit's LR stages (``plan``), and everything a checkpoint keeps in one object
(``state``: :class:`~lightning_smd.core.state.SMDState`).
"""
