r"""Tempering a Pyro model: its likelihood raised to a power :math:`\beta`, its prior kept."""

from __future__ import annotations

from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message


class temper(Messenger):
    r"""Raise the model's likelihood to the power ``beta``: within this handler every
    observed site (``obs=``, and ``pyro.factor``) has its log-density scaled by ``beta``;
    latent sites keep theirs. The model's density becomes :math:`p(z)\, p(y \mid
    z)^\beta`, whose posterior is the prior at :math:`\beta = 0` and the posterior at
    :math:`\beta = 1`.

    Raising :math:`\beta` from near 0 to 1 over the first part of training (annealing, as
    in Rezende & Mohamed 2015, sec. 6.1) lets a guide spread over the prior's wide support
    before the likelihood's modes pull it in, so it settles less often on one mode of
    several. Use it around the SVI step; the guide's sites are latent and unaffected. The
    value of ``beta`` is the caller's, step by step: the handler keeps no schedule.

    Sites made observed by ``poutine.condition`` count as observed too: temper the model,
    not a conditioned copy of its latent sites.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> import pyro.poutine as poutine
        >>> def model():
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     pyro.sample("y", dist.Normal(mu, 1.0), obs=torch.tensor(2.0))
        >>> with temper(0.5):
        ...     trace = poutine.trace(model).get_trace()
        >>> trace.nodes["mu"]["scale"], trace.nodes["y"]["scale"]
        (1.0, 0.5)
    """

    def __init__(self, beta: float) -> None:
        if not 0.0 <= float(beta) <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {beta}")
        super().__init__()
        self.beta = float(beta)

    def _pyro_sample(self, msg: Message) -> None:
        if msg["is_observed"]:
            msg["scale"] = self.beta * msg["scale"]
