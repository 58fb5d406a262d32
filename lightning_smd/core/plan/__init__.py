"""The plan of a fit: its learning-rate stages per param group and when each reaches equilibrium.

At fit start the schedule is known, so SMD can say in advance which LR stages are long enough for
the weight norms (and Δ_t) to reach the stage's equilibrium, and where ``rescale=True`` helps.

Two layers:

* a pure core, :func:`build_plan`: per param group a :class:`GroupSchedule` (η, λ, α at the optimizer
  steps where they change, plus the rest of the param group) → :class:`Plan`. Every number
  comes from :mod:`lightning_smd.theory`: Δ* (``GroupTheory.angular_update``), the relaxation time
  (1 − α)/(4λη) (``GroupTheory.relaxation_steps``), Corollary 3.1's steps to the new equilibrium
  (``GroupTheory.steps_to_equilibrium_from``), the equilibrium ratio k
  (:func:`~lightning_smd.theory.equilibrium_ratio`) and, for the first stage,
  :func:`~lightning_smd.theory.settling_steps`.
* a Lightning builder, :func:`plan_from_trainer`: steps copies of the configured schedulers, bound
  to stand-in optimizers that hold copies of the param groups only (no parameters, no state, no
  hooks are copied), exactly as Lightning's fit loop would step the real ones; the real optimizers
  and schedulers are never stepped (checked after planning).

How a schedule is cut into stages (:func:`split_stages`):

1. Steps with identical hyper-parameters form a *segment* (a MultiStep schedule has one segment per
   milestone, a per-step cosine one segment per step).
2. A new *stage* starts at the first segment whose equilibrium ratio k = (η·λ')/(η'·λ) against the
   stage's first segment reaches ``min_drop`` in either direction (default 2, the rescale policy's
   ``RescalePolicy.min_drop``: the changes the rescale reacts to), or where η or λ becomes 0 (no
   formula). A group without weight decay is cut on η alone. A piecewise-constant schedule gets one stage per value; a continuous one (cosine,
   OneCycle, polynomial) one stage per factor ``min_drop`` of ηλ.
3. A stage shorter than ``min_stage_fraction`` of the planned steps (default 1 %) absorbs the
   next one (a short final stage joins the previous one), so a cosine tail near η = 0 does not
   make dozens of stages.
4. A warm-up, stages at the start that only rise, joins the stage it ramps up to, whatever its
   length: the settling from the initialisation is judged on the stage that follows it.
5. Each stage is described by its *representative* values: the step-weighted median (by η/λ) of
   its values, among those with an equilibrium formula. For a piecewise-constant stage that is its
   value; for warm-up + plateau the plateau (when it is most of the stage); for a ramp its middle
   (within a factor ``min_drop`` of every value of the ramp, by rule 2). ``lr`` shows
   first→last where the rate varies inside the stage (``continuous``).

"Long enough": the stage lasts at least the steps its equilibrium needs. After a change that is
Corollary 3.1, ``⌈|ln k|·(1 − α)/(4λη')⌉`` from the previous stage's representative values. For the
first stage the distance from the initialisation is unknown before L is measured, so it needs
``first_stage_time_constants`` (default 3) relaxation times ``(1 − α)/(4λη)`` (the deviation shrinks
by e^(−3), 95 % of the way; :func:`~lightning_smd.theory.settling_steps`). AdamW and Lion have a Δ*
but no relaxation formula in the theory: their stages say so instead of guessing.

Cost: only changes are recorded, MultiStepLR/StepLR/ConstantLR skip the ticks where nothing
changes, LambdaLR calls its lambdas directly. Goyal's ImageNet schedule (90 epochs × 5004 steps,
epoch-interval MultiStepLR) plans in about a millisecond; the same at step interval (450 360
ticks) in about 0.3 s, COCO 4x (360 000 LambdaLR ticks with warm-up) in under 1 s; a per-step
``CosineAnnealingLR`` / ``OneCycleLR`` costs torch's ``get_lr`` per tick (≈ 3 s for 450 000 on a
busy 2-core CPU).
"""

from lightning_smd.core.plan.simulate import plan_fit, plan_from_trainer, scheduler_ticks
from lightning_smd.core.plan.stages import (
    DEFAULT_MIN_DROP,
    DEFAULT_MIN_STAGE_FRACTION,
    FIRST_STAGE_TIME_CONSTANTS,
    GroupSchedule,
    Plan,
    Stage,
    build_plan,
    split_stages,
)

__all__ = [
    "plan_fit",
    "DEFAULT_MIN_DROP",
    "DEFAULT_MIN_STAGE_FRACTION",
    "FIRST_STAGE_TIME_CONSTANTS",
    "GroupSchedule",
    "Plan",
    "Stage",
    "build_plan",
    "plan_from_trainer",
    "scheduler_ticks",
    "split_stages",
]
