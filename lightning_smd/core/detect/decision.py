"""Decision: combine structural and numerical evidence into the chosen tensors, and filter names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lightning_smd.core.detect.candidate import Candidate, clean_name
from lightning_smd.core.detect.modules import is_norm_module
from lightning_smd.core.detect.numerics import discovery_threshold

__all__ = ["DETECT_MODES", "decide", "normalization_parameters", "select"]

DETECT_MODES = ("auto", "structural", "numerical")


def _matcher(pattern: Any, argument: str) -> Callable[[str], bool] | None:
    if pattern is None:
        return None
    if callable(pattern):
        return lambda name: bool(pattern(name))
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, (list, tuple)) or not all(isinstance(p, str) for p in patterns):
        raise ValueError(
            f"{argument} must be None, a regex string, a list of regex strings or a callable, "
            f"got {pattern!r}"
        )
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as err:
        raise ValueError(f"invalid regular expression in {argument}: {err}") from err
    return lambda name: any(c.search(name) for c in compiled)


def select(names: Iterable[str], include: Any = None, exclude: Any = None) -> list[str]:
    """Filter ``names``.

    ``include``/``exclude`` are each ``None``, a regex (``re.search``), a list of regexes (any
    matches) or a callable ``name -> bool``. ``include`` keeps only matching names, ``exclude``
    drops matching names. Raises ``ValueError`` naming the argument on an invalid regex or type.
    """
    keep = _matcher(include, "include")
    drop = _matcher(exclude, "exclude")
    return [
        n for n in names if (keep is None or keep(n)) and (drop is None or not drop(n))
    ]



def normalization_parameters(module: nn.Module) -> set[str]:
    """Clean names of the normalization layers' own parameters (γ, β) inside ``module``."""
    return {
        clean_name(f"{prefix}.{name}" if prefix else name)
        for prefix, sub in module.named_modules()
        if is_norm_module(sub)
        for name, _ in sub.named_parameters(recurse=False)
    }


def decide(
    structural: dict[str, Candidate],
    cosines: dict[str, float],
    detect: str,
    threshold: float,
    never_numerical: Iterable[str] = (),
    confirm_threshold: float | None = None,
    *,
    numels: Mapping[str, int] | None = None,
    dtypes: Mapping[str, torch.dtype] | None = None,
    confirm: Callable[[list[str]], Mapping[str, str | None]] | None = None,
    eps_dominated: Mapping[str, str] | None = None,
    eps_defect: Mapping[str, float] | None = None,
) -> tuple[dict[str, Candidate], dict[str, str]]:
    """Combine the two kinds of evidence; returns ``(chosen, rejected)`` (rejected: name → why).

    * ``"structural"``: the structural candidates.
    * ``"numerical"``: tensors whose radial cosine is below ``threshold``.
    * ``"auto"``: structural candidates the radial cosine does not contradict (unmeasured ones,
      e.g. without a gradient, are kept), plus numerically invariant tensors structure missed.

    ``never_numerical`` (normally :func:`normalization_parameters`) is never *discovered*
    numerically: a norm layer's γ whose β is still ≈0, followed by ReLU → conv → BN, is
    invariant jointly with β only, yet its radial cosine in the first steps is as small as a
    true invariant's (1e-6 on torchvision ResNets).

    ``confirm_threshold`` (default ``threshold``) is the bar a *structural* candidate must pass:
    16-bit gradients put true invariants at radial cosines of 1e-4 to 1e-3, so the callback
    confirms structure more loosely there while numerical discoveries keep the strict bar.

    Numerical *discoveries* (tensors structure did not explain) need evidence that scales with
    the tensor: with ``numels`` (name → number of entries; ``dtypes`` optional) the bar is
    :func:`~lightning_smd.core.detect.numerics.discovery_threshold` (``min(threshold,
    max(1e-2/√n, precision floor))``: a large non-invariant matrix reaches 1e-4 by chance), and
    with ``confirm`` (names → ``{name: None | why refuted}``, normally a closure over
    :func:`~lightning_smd.core.detect.numerics.confirm_scale_invariance`) each discovery must also
    pass the finite-difference check ``w → 2w`` at a generic point; refuted ones go to
    ``rejected``; with ``confirm`` the size-aware bar is not capped at ``threshold`` (it only
    chooses which tensors the exact check runs on). Without them the bar is ``threshold`` alone.

    ``eps_dominated`` (name → why, from the recorded forward: the normalization's input variance
    is within ``EPS_MARGIN``·eps) settles those structural candidates in ``"auto"`` mode without
    looking at the radial cosine: they are left out. Their radial cosine is ``≈ eps/(var+eps)``
    times how the gradient happens to align, so a cosine bar would keep or drop them by chance,
    differently for ``find_scale_invariant`` (one projection at init) and ``SMDCallback`` (the
    loss's gradients over several steps). Deciding by the recorded variance makes both take the
    same decision from the same model and batch. For the same reason the bar of every other
    structural candidate is at least its ``eps_defect`` (``eps/(var+eps)`` of the normalizations it
    feeds, below 1 % once outside ``EPS_MARGIN``): the radial cosine then refutes structure only
    beyond what eps explains.
    """
    if detect not in DETECT_MODES:
        allowed = ", ".join(map(repr, DETECT_MODES))
        raise ValueError(f"detect must be one of {allowed}, got {detect!r}")
    if detect == "structural":
        return dict(structural), {}
    chosen: dict[str, Candidate] = {}
    rejected: dict[str, str] = {}
    bar = threshold if confirm_threshold is None else confirm_threshold
    if detect == "auto":
        for name, candidate in structural.items():
            cos = cosines.get(name, math.nan)
            if eps_dominated and name in eps_dominated:
                rejected[name] = f"{candidate.reason}, but eps-dominated: {eps_dominated[name]}"
            elif cos >= (own := max(bar, (eps_defect or {}).get(name, 0.0))):
                rejected[name] = f"{candidate.reason}, but radial cosine {cos:.1e} >= {own:.2g}"
            else:
                chosen[name] = candidate
    skip = set(never_numerical) | set(structural)
    discovered: dict[str, Candidate] = {}
    for name, cos in cosines.items():
        if name in skip:
            continue
        bar = threshold
        if numels is not None and name in numels:
            dtype = (dtypes or {}).get(name, torch.float32)
            # with the exact finite-difference check behind it, the size-aware bar is only a prefilter:
            # not capped at `threshold`, so eps or a loss's alignment cannot hide a small invariant tensor
            bar = discovery_threshold(1.0 if confirm is not None else threshold, numels[name], dtype)
        if cos < bar:  # NaN (never measured) compares False
            why = f"numerical: radial cosine {cos:.1e} < {bar:.1e}"
            discovered[name] = Candidate(name, why, "numerical", kind="numerical: radial cosine under the bar")
    if confirm is not None and discovered:
        verdicts = confirm(list(discovered))
        for name in list(discovered):
            why = verdicts.get(name, "not checked")
            if why is not None:
                rejected[name] = f"{discovered.pop(name).reason}, but {why}"
            else:
                c = discovered[name]
                discovered[name] = replace(c, reason=f"{c.reason}, confirmed: L(2w) = L(w)")
    chosen.update(discovered)
    return chosen, rejected
