"""Behaviours of the curvature tools that no other test pinned down (found by mutation testing): the
SLQ resolution gate, the sign power iteration gives a sign-ambiguous iterate, Hutchinson's standard
error.  Each is checked against an independent reference (a hand-built report, the start vector's
dominant eigen-component, the estimator's closed-form variance and its spread over seeds)."""
from __future__ import annotations

import math

import pytest
import torch

from shortcut_ext.curvature import hutchinson_trace, power_iteration
from shortcut_ext.curvature.condition import ConditionReport, report_resolved

F64 = torch.float64


def _slq_report(index_unresolved_mass, lam_q10_resolved=True):
    return ConditionReport(1.0, float("nan"), 0.1, 0.3, float("nan"), 10.0, [], [], "lanczos+slq", 100,
                           uncertainty={"lam_q10_resolved": lam_q10_resolved,
                                        "index_unresolved_mass": index_unresolved_mass})


def test_report_resolved_gates_the_index_at_five_percent():
    """Not pinned: ``report_resolved``'s gate on ``index_unresolved_mass`` (below 0.05: the index may be
    off by up to about that much).  Every test's unresolved mass was far from the gate, so a gate of 0.5
    (an index off by up to 0.5 called resolved) passed."""
    assert report_resolved(_slq_report(0.0))
    assert report_resolved(_slq_report(0.049))
    assert not report_resolved(_slq_report(0.05))
    assert not report_resolved(_slq_report(0.051))
    assert not report_resolved(_slq_report(0.2))
    assert not report_resolved(_slq_report(0.0, lam_q10_resolved=False))
    exact = ConditionReport(1.0, 0.5, 0.6, 0.0, 2.0, 1.7, [], [], "exact", 3)  # no uncertainty: exact
    assert report_resolved(exact)


@pytest.mark.parametrize("dominant", [-1, 1])
def test_power_iteration_sign_when_ambiguous(dominant):
    """Not pinned: the sign ``power_iteration`` reports when the iterate mixes the ``+|lambda|max`` and
    ``-|lambda|max`` eigenvectors.  Documented: the sign whose eigen-component dominates the iterate.  The
    tests had iterates dominated by the positive eigenvector only, or a symmetric spectrum's
    ``abs_eigenvalue``; flipping the rule passed.  Reference: with ``A = diag(5, -5, 1)`` the components on
    ``e_1`` and ``e_2`` keep their ratio (the third decays), so the start vector's dominant one decides."""
    A = torch.diag(torch.tensor([5.0, -5.0, 1.0], dtype=F64))
    v0 = torch.tensor([1.0, 0.1, 0.3], dtype=F64) if dominant > 0 else torch.tensor([0.1, 1.0, 0.3], dtype=F64)
    r = power_iteration(A, v0=v0, max_iter=200)
    assert r.sign_ambiguous and r.converged
    assert r.abs_eigenvalue == pytest.approx(5.0, rel=1e-12)
    assert r.eigenvalue == pytest.approx(5.0 * dominant, rel=1e-12)
    # the residual is the other (minor) eigen-component's: ||A v - lambda v|| = 10 * 0.1 / ||(1, 0.1)||
    assert r.residual == pytest.approx(1.0 / math.sqrt(1.01), rel=1e-6)


def test_hutchinson_std_error_is_the_standard_error_of_the_mean():
    """Not pinned: the value of Hutchinson's ``std_error`` (the standard error of the estimate, the probes'
    std over sqrt(s)).  Tests only used it as a finite number, so the probes' std itself (10x larger here)
    passed.  References: the closed-form variance of a Rademacher probe, ``2 (||A||_F^2 - sum A_ii^2)``,
    and the spread of the estimate over 40 seeds."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(50, 50, generator=g, dtype=F64)
    A = B + B.T
    s = 100
    exact_se = math.sqrt(2 * (float((A ** 2).sum()) - float((A.diagonal() ** 2).sum())) / s)  # 9.79
    runs = [hutchinson_trace(A, s, seed=seed) for seed in range(40)]
    for r in runs:  # one seed's own estimate of the standard error: 7.7 to 12.0 here
        assert exact_se / 1.5 < r.std_error < 1.5 * exact_se
    spread = float(torch.tensor([r.estimate for r in runs], dtype=F64).std())  # 9.2
    mean_se = sum(r.std_error for r in runs) / len(runs)
    assert mean_se / 1.5 < spread < 1.5 * mean_se
    assert abs(sum(r.estimate for r in runs) / len(runs) - float(torch.trace(A))) < 3 * spread / math.sqrt(40)
