"""Bijections pyroflows registers for supports torch and Pyro leave without one."""

from __future__ import annotations

import torch
from torch.distributions import biject_to, constraints

from pyroflows.inference.supports import VecToLowerCholesky


def test_lower_cholesky_has_a_registered_bijection():
    assert isinstance(biject_to(constraints.lower_cholesky), VecToLowerCholesky)


def test_vec_to_lower_cholesky_round_trip_and_support():
    t = VecToLowerCholesky()
    v = torch.randn(4, 6, dtype=torch.float64)
    matrix = t(v)
    assert matrix.shape == (4, 3, 3)
    assert constraints.lower_cholesky.check(matrix).all()
    torch.testing.assert_close(t.inv(matrix), v)
    assert t.forward_shape((4, 6)) == (4, 3, 3) and t.inverse_shape((4, 3, 3)) == (4, 6)


def test_vec_to_lower_cholesky_log_det_matches_autograd():
    t = VecToLowerCholesky()
    v = torch.randn(6, dtype=torch.float64)
    rows, cols = torch.tril_indices(3, 3)
    jac = torch.autograd.functional.jacobian(lambda x: t(x)[rows, cols], v)
    torch.testing.assert_close(t.log_abs_det_jacobian(v, t(v)), torch.linalg.slogdet(jac)[1])
