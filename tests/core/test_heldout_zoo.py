"""Detection on hand-written patterns the rules never named (``tests/heldout_zoo.py``) against the
brute-force oracle: precision 1.0, recall ≥ 0.98, for ``find_scale_invariant`` and for
``SMDCallback`` in a real ``Trainer.fit``."""

from __future__ import annotations

import pytest

from tests.heldout_zoo import heldout_zoo
from tests.core.test_zoo import _check, _score_model


def test_heldout_patterns_against_oracle():
    _check([_score_model(z) for z in heldout_zoo()])


FIT_DEFAULT = {"held/pool_upsample"}  # the one the callback missed before


@pytest.mark.parametrize("name", [pytest.param(z.name, marks=() if z.name in FIT_DEFAULT else pytest.mark.slow)
                                  for z in heldout_zoo()])
def test_heldout_fit_decision_equals_find_scale_invariant(name, tmp_path):
    from tests.lightning.test_zoo_fit import fit_decision

    entry = next(z for z in heldout_zoo() if z.name == name)
    callback, function, _ = fit_decision(entry, tmp_path)
    assert callback == function, f"callback only: {sorted(callback - function)}; function only: {sorted(function - callback)}"
