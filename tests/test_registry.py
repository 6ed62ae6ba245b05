"""The registry: names, options, errors, and a user's own family working like a built-in."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch

import pyroflows
from pyroflows.transforms import Flow, FlowStack, Planar, registry

BUILT_IN = {"actnorm", "glow", "linear", "nice", "planar", "radial", "realnvp"}


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry that the test may add to, restored afterwards."""
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))


def test_every_built_in_family_is_listed():
    assert BUILT_IN <= set(pyroflows.list_flows())
    assert pyroflows.list_flows() == sorted(pyroflows.list_flows())


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_build_returns_a_pyro_transform_module_of_the_right_dim(name):
    flow = pyroflows.build(name, 5)
    assert isinstance(flow, dist.TransformModule)
    assert isinstance(flow, FlowStack)
    assert flow.dim == 5


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown flow family 'nvp'.*planar.*realnvp"):
        pyroflows.build("nvp", 3)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"no option 'depth'; its options are: layers"):
        pyroflows.build("planar", 3, depth=4)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"layers": 0}, ValueError, "layers must be a positive integer"),
        ({"layers": 2.5}, TypeError, "layers must be a positive integer"),
        ({"hidden": 64}, TypeError, "hidden must be a sequence"),
        ({"hidden": (64, 0)}, ValueError, r"hidden\[1\] must be a positive integer"),
        ({"activation": "sigmoid"}, ValueError, "activation must be one of"),
        ({"mask": "checkers"}, ValueError, "mask must be one of 'alternate', 'random'"),
        ({"clamp": -1.0}, ValueError, "clamp must be a finite positive number"),
    ],
)
def test_bad_option_values_name_the_option(options, error, message):
    with pytest.raises(error, match=message):
        pyroflows.build("realnvp", 3, **options)


@pytest.mark.parametrize("dim", [0, -2, 2.0, True])
def test_bad_dim_is_refused(dim):
    with pytest.raises((ValueError, TypeError), match="dim must be a positive integer"):
        pyroflows.build("realnvp", dim)


def test_a_users_family_works_like_a_built_in(scratch_registry):
    @pyroflows.register_flow("two_planar")
    def two_planar(dim: int, *, layers: int = 2) -> FlowStack:
        return FlowStack(Planar(dim) for _ in range(layers))

    assert "two_planar" in pyroflows.list_flows()
    flow = pyroflows.build("two_planar", 3, layers=3)
    assert len(flow) == 3
    base = dist.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    q = pyroflows.FlowDistribution(base, flow)
    y, log_q = q.rsample_and_log_prob((4,))
    torch.testing.assert_close(log_q, q.log_prob(y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="its options are: layers"):
        pyroflows.build("two_planar", 3, hidden=(8,))


def test_registering_a_taken_name_is_refused(scratch_registry):
    with pytest.raises(ValueError, match="'planar' is already registered"):
        pyroflows.register_flow("planar")(lambda dim: FlowStack([Planar(dim)]))


@pytest.mark.parametrize("name", ["", "has space", 3])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="must be an identifier string"):
        pyroflows.register_flow(name)


def test_a_family_that_returns_no_flow_is_refused(scratch_registry):
    pyroflows.register_flow("not_a_flow")(lambda dim: torch.nn.Linear(dim, dim))
    with pytest.raises(TypeError, match=r"returned Linear, not a pyroflows\.Flow"):
        pyroflows.build("not_a_flow", 2)


def test_a_family_of_the_wrong_dim_is_refused(scratch_registry):
    pyroflows.register_flow("off_by_one")(lambda dim: FlowStack([Planar(dim + 1)]))
    with pytest.raises(ValueError, match="built a flow of dim 3, not 2"):
        pyroflows.build("off_by_one", 2)


def test_flow_is_the_documented_base_class():
    assert pyroflows.Flow is Flow
