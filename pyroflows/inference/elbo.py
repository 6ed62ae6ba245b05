r"""The stratified Rényi bounds as a Pyro ELBO: mixture guides, IWAE and Rényi for SVI.

:class:`StratifiedELBO` estimates the bound :math:`\mathcal{L}_\alpha` of
:mod:`pyroflows.inference.bounds` for a Pyro model and guide: with an
:class:`~pyroflows.AutoFlow` of ``components=K`` flows it draws ``num_particles`` times
from *each* component (the component pinned, not drawn), weighs each draw by
:math:`w = p(x, z) / q(z)` with :math:`q` the whole mixture, and combines them with the
learned weights :math:`\pi`, so the gradient reaches every component and every weight
without a score-function term. With one component (any guide whose sites are all
reparametrised) it is the ELBO (``alpha=1``), the importance-weighted bound IWAE
(``alpha=0``, ``importance=T`` draws per group), or a Rényi bound in between.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from torch import Tensor

from pyroflows._checks import check_positive_int
from pyroflows.inference.bounds import check_alpha, stratified_estimate
from pyroflows.inference.guides import AutoFlow


class StratifiedELBO(ELBO):
    r"""The stratified Rényi bound :math:`\mathcal{L}_\alpha` (:mod:`~pyroflows.inference.bounds`)
    as a Pyro ELBO, with ``num_particles`` draws per component in groups of ``importance``.

    ``alpha=1`` is the (stratified) ELBO, ``alpha=0`` the (stratified) importance-weighted
    bound, tighter with ``importance``; every ``alpha >= 0`` bounds :math:`\log p(x)`.
    ``vectorize_particles=True`` draws each component's particles in one plate (the model
    must then broadcast over a leading batch dimension, as for Pyro's own ELBOs);
    otherwise the model runs once per draw. Every guide site must be reparametrised.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI
        >>> import pyroflows
        >>> modes = dist.MixtureSameFamily(  # two modes, weights 0.3 and 0.7
        ...     dist.Categorical(torch.tensor([0.3, 0.7])),
        ...     dist.Normal(torch.tensor([-3.0, 3.0]), 0.5))
        >>> def model():
        ...     z = pyro.sample("z", dist.Normal(0.0, 5.0))  # a prior symmetric about 0
        ...     pyro.factor("modes", modes.log_prob(z))
        >>> guide = pyroflows.AutoFlow(model, "planar", components=2)
        >>> elbo = StratifiedELBO(num_particles=8, vectorize_particles=True)
        >>> svi = SVI(model, guide, pyroflows.decaying_adam(300, lr=0.05), elbo)
        >>> for _ in range(300):
        ...     loss = svi.step()
        >>> shares = guide.weights.sort().values
        >>> bool((shares - torch.tensor([0.3, 0.7])).abs().max() < 0.05)
        True
    """

    def __init__(
        self,
        num_particles: int = 1,
        *,
        alpha: float = 1.0,
        importance: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
    ) -> None:
        check_positive_int("num_particles", num_particles)
        self.alpha = check_alpha(alpha)
        self.importance = check_positive_int("importance", importance)
        if num_particles % importance:
            raise ValueError(
                f"num_particles={num_particles} must be a multiple of importance={importance}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
        )

    def _get_trace(
        self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
    ) -> tuple[Any, Any]:
        model_trace, guide_trace = get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs
        )
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise ValueError(
                    f"StratifiedELBO needs reparametrised guide sites; {name!r} is drawn from "
                    f"{type(site['fn']).__name__}, which has no rsample"
                )
        return model_trace, guide_trace

    def _log_weights(
        self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
    ) -> Tensor:
        r""":math:`\log p(x, z) - \log q(z)` of each of ``num_particles`` draws, ``(n,)``."""
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            for trace, sign in ((model_trace, 1), (guide_trace, -1)):
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
            particles.append(log_w)
        if self.vectorize_particles:  # one trace, the particles along its leftmost dim
            return torch.as_tensor(particles[0]).reshape(self.num_particles, -1).sum(-1)
        return torch.stack([torch.as_tensor(p).sum() for p in particles])

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Tensor:
        """The negative bound, differentiable in the guide's parameters."""
        if isinstance(guide, AutoFlow) and guide.stl and self.alpha != 1:
            raise ValueError(
                "AutoFlow(stl=True) is for the ELBO (alpha=1): its path-derivative gradient "
                f"is biased for alpha={self.alpha}; use stl=False"
            )
        mixture = isinstance(guide, AutoFlow) and guide.components > 1
        pins = [guide.pinned(k) for k in range(guide.components)] if mixture else [nullcontext()]
        rows = []
        for pin in pins:  # draws of each component in turn
            with pin:
                rows.append(self._log_weights(model, guide, args, kwargs))
        log_w = torch.stack(rows)  # (K, n)
        log_pi = guide.logits.log_softmax(-1) if mixture else log_w.new_zeros(1)
        bound = stratified_estimate(log_w, log_pi, alpha=self.alpha, importance=self.importance)
        return -bound

    def loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative bound, a float."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative bound, a float, its gradient accumulated in the parameters."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return float(loss.detach())
