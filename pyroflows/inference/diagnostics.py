r"""Is the variational approximation good enough? Importance-weight checks, built on arviz.

With draws :math:`z_s \sim q` and log importance weights
:math:`\log w_s = \log p(x, z_s) - \log q(z_s)`:

* the importance-weighted ELBO :math:`\log \frac1S \sum_s w_s` is a tighter lower bound on
  :math:`\log p(x)` than the ELBO :math:`\frac1S \sum_s \log w_s` (Burda et al. 2016);
* the effective sample size of the self-normalised weights, :math:`(\sum w)^2 / \sum w^2`
  (Kish), says how many of the draws count;
* the Pareto shape :math:`\hat k` of the upper tail of the weights (PSIS, Vehtari et al.
  2024) says whether importance sampling from :math:`q` works at all. Yao et al. (2018)
  read it as a check of the whole approximation: :math:`\hat k < 0.5` good (:math:`q` is
  close to the posterior and importance sampling converges fast), :math:`0.5 \le \hat k
  < 0.7` acceptable (estimates usable with PSIS), :math:`\hat k \ge 0.7` unreliable (the
  weights have too heavy a tail: :math:`q` misses mass of the posterior; do not trust
  its means or intervals).

References:
    Yes, but Did It Work?: Evaluating Variational Inference (Yao, Vehtari, Simpson &
    Gelman, 2018) https://arxiv.org/abs/1802.02538

    Pareto Smoothed Importance Sampling (Vehtari, Simpson, Gelman, Yao & Gabry, 2024)
    https://arxiv.org/abs/1507.02646

    Importance Weighted Autoencoders (Burda, Grosse & Salakhutdinov, 2016)
    https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from torch import Tensor

from pyroflows._checks import check_positive_int

if TYPE_CHECKING:
    import arviz


@dataclass(frozen=True)
class Diagnosis:
    """Importance-weight diagnostics of a variational approximation (see the module doc)."""

    k_hat: float
    ess: float
    elbo: float
    iw_elbo: float
    num_samples: int

    @property
    def verdict(self) -> str:
        """``"good"`` (k-hat < 0.5), ``"acceptable"`` (< 0.7) or ``"unreliable"``."""
        if self.k_hat < 0.5:
            return "good"
        return "acceptable" if self.k_hat < 0.7 else "unreliable"


def psis_khat(log_weights: Tensor) -> float:
    r"""The Pareto shape :math:`\hat k` of the weights' upper tail (arviz's PSIS).

    Equal weights (``q`` is the posterior; equal to 1e-9 nats, i.e. up to rounding) have no
    tail: :math:`\hat k = -\infty`.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> psis_khat(0.1 * torch.randn(1000)) < 0.5, psis_khat(3 * torch.randn(1000)) > 0.7
        (True, True)
    """
    return _psis(_as_numpy(log_weights))[1]


def _psis(values: np.ndarray) -> tuple[np.ndarray, float]:
    r"""Pareto-smoothed log weights (unnormalised) and :math:`\hat k` of the log weights
    ``values``; equal weights (to 1e-9 nats) are left as they are, with :math:`\hat k =
    -\infty`."""
    import arviz as az  # imported on use: it is slow to import

    if np.ptp(values) < 1e-9:  # equal weights: q is the target, nothing to smooth
        return np.zeros_like(values), -math.inf
    with warnings.catch_warnings():  # arviz warns when k-hat is high; k-hat says so
        warnings.simplefilter("ignore")
        smoothed, k_hat = az.psislw(values - values.max())
    return smoothed, float(k_hat)


def effective_sample_size(log_weights: Tensor) -> float:
    r"""Kish's effective sample size :math:`(\sum w)^2 / \sum w^2` of the weights.

    Example:
        >>> import torch
        >>> effective_sample_size(torch.tensor([0.0, 0.0, -1e9]))
        2.0
    """
    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    return math.exp((2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)).item())


def importance_weighted_elbo(log_weights: Tensor) -> float:
    r""":math:`\log \frac1S \sum_s w_s`, a lower bound on the log evidence.

    Example:
        >>> import torch
        >>> round(importance_weighted_elbo(torch.log(torch.tensor([1.0, 3.0]))), 6)  # log 2
        0.693147
    """
    lw = torch.as_tensor(log_weights, dtype=torch.float64)
    return (torch.logsumexp(lw, 0) - math.log(len(lw))).item()


def log_importance_weights(
    q: Any, target: Callable[..., Any], *args: Any, num_samples: int = 1000, **kwargs: Any
) -> Tensor:
    r"""Log importance weights :math:`\log p - \log q` of ``num_samples`` draws of ``q``.

    Either ``q`` is a Pyro guide and ``target`` its model (called with ``*args,
    **kwargs``; each draw traces the guide and replays the model, so any model works), or
    ``q`` is a distribution (e.g. from :func:`pyroflows.fit_reverse_kl`) and ``target`` a
    log-density of a batch of points.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> lw = log_importance_weights(q, q.log_prob, num_samples=10)
        >>> lw.abs().max().item()
        0.0
    """
    num_samples = check_positive_int("num_samples", num_samples)
    if isinstance(q, AutoGuide):
        return _guide_draws(q, target, num_samples, args, kwargs)[1]
    with torch.no_grad():
        z = q.sample((num_samples,))
        return target(z) - q.log_prob(z)


def diagnose(
    q: Any, target: Callable[..., Any], *args: Any, num_samples: int = 1000, **kwargs: Any
) -> Diagnosis:
    """All importance-weight diagnostics of ``q`` against ``target`` in one call.

    Takes the same arguments as :func:`log_importance_weights`.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> q = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> p = dist.Normal(torch.zeros(2), 1.1).to_event(1)
        >>> diagnose(q, p.log_prob, num_samples=2000).verdict
        'good'
    """
    lw = log_importance_weights(q, target, *args, num_samples=num_samples, **kwargs)
    if not bool(torch.isfinite(lw).all()):
        raise ValueError("some log importance weights are not finite: q puts mass where p is 0")
    return Diagnosis(
        k_hat=psis_khat(lw),
        ess=effective_sample_size(lw),
        elbo=lw.mean().item(),
        iw_elbo=importance_weighted_elbo(lw),
        num_samples=num_samples,
    )


@dataclass(frozen=True)
class Resampled:
    r"""Draws of ``q`` corrected towards the target by Pareto-smoothed importance sampling.

    ``proposals`` are ``q``'s draws by site (latent and deterministic sites of a guide's
    model; ``{"z": ...}`` for a distribution), ``weights``
    their PSIS-smoothed, self-normalised importance weights (they sum to 1), ``draws`` a
    resample of the proposals with those weights (with replacement), and ``k_hat`` the
    Pareto shape that says how far to trust either (:class:`Diagnosis`).
    """

    proposals: dict[str, Tensor]
    weights: Tensor
    draws: dict[str, Tensor]
    k_hat: float

    def mean(self) -> dict[str, Tensor]:
        r"""The PSIS estimate of each site's posterior mean, :math:`\sum_s \tilde w_s z_s`:
        the same draws' weighted average, without the resampling's extra noise."""
        return {
            name: torch.tensordot(self.weights.to(values.dtype), values, dims=1)
            for name, values in self.proposals.items()
        }


def importance_resample(
    q: Any,
    target: Callable[..., Any],
    *args: Any,
    num_samples: int = 1000,
    resamples: int | None = None,
    generator: torch.Generator | None = None,
    **kwargs: Any,
) -> Resampled:
    r"""Draw ``num_samples`` from ``q``, weight them by :math:`p / q` with Pareto smoothing
    (PSIS: the largest weights replaced by quantiles of a fitted generalized Pareto tail),
    and resample ``resamples`` of them (default ``num_samples``) by those weights.

    Takes ``q`` and ``target`` as :func:`log_importance_weights` does (a guide and its
    model, with ``*args, **kwargs``; or a distribution and a batched log-density). Where
    ``q`` is close to the posterior but not on it (:math:`\hat k` below 0.7), the weighted
    draws estimate the posterior better than ``q``'s own: its means
    (:meth:`Resampled.mean`) and intervals (from ``draws``) move towards the target's.
    Where :math:`\hat k \ge 0.7` the weights are too heavy-tailed for that, and the result
    says so in ``k_hat``, as :func:`diagnose` does.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> q = dist.Normal(torch.full((1,), 0.3), 1.0).to_event(1)
        >>> p = dist.Normal(torch.zeros(1), 1.0).to_event(1)
        >>> _ = torch.manual_seed(0)
        >>> fixed = importance_resample(q, p.log_prob, num_samples=4000)
        >>> bool(fixed.mean()["z"].abs() < 0.1), fixed.k_hat < 0.5, fixed.draws["z"].shape
        (True, True, torch.Size([4000, 1]))
    """
    num_samples = check_positive_int("num_samples", num_samples)
    resamples = num_samples if resamples is None else check_positive_int("resamples", resamples)
    if isinstance(q, AutoGuide):
        proposals, log_weights = _guide_draws(q, target, num_samples, args, kwargs)
    else:
        with torch.no_grad():
            z = q.sample((num_samples,))
            proposals, log_weights = {"z": z}, target(z) - q.log_prob(z)
    values = _as_numpy(log_weights)
    if not np.isfinite(values).all():
        raise ValueError("some log importance weights are not finite: q puts mass where p is 0")
    smoothed, k_hat = _psis(values)
    weights = torch.as_tensor(np.exp(smoothed - smoothed.max()), dtype=torch.float64)
    weights = (weights / weights.sum()).to(log_weights.device)
    picks = torch.multinomial(weights.cpu(), resamples, replacement=True, generator=generator)
    draws = {name: values[picks.to(values.device)] for name, values in proposals.items()}
    return Resampled(proposals, weights, draws, k_hat)


def to_inference_data(
    guide: AutoGuide, model: Callable[..., Any], *args: Any, num_samples: int = 1000, **kwargs: Any
) -> arviz.InferenceData:
    """Draws of a guide as an arviz ``InferenceData``, like MCMC output with one chain.

    The ``posterior`` group holds every latent site and every ``pyro.deterministic`` site
    of the model by name, with shape ``(1, num_samples, *site_shape)``; ``sample_stats``
    holds each draw's ``log_importance_weight``, so ``az.summary``, ``az.plot_posterior``
    and the checks above work on a guide as on MCMC output.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyroflows import AutoFlow
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        >>> data = to_inference_data(AutoFlow(model), model, num_samples=50)
        >>> data.posterior["x"].shape
        (1, 50, 3)
    """
    import arviz as az

    num_samples = check_positive_int("num_samples", num_samples)
    draws, lw = _guide_draws(guide, model, num_samples, args, kwargs)
    posterior = {name: _as_numpy(values)[None] for name, values in draws.items()}
    return az.from_dict(
        posterior=posterior, sample_stats={"log_importance_weight": _as_numpy(lw)[None]}
    )


@torch.no_grad()
def _guide_draws(
    guide: AutoGuide, model: Callable[..., Any], num_samples: int, args: tuple, kwargs: dict
) -> tuple[dict[str, Tensor], Tensor]:
    """Latent and deterministic site values of ``num_samples`` guide draws, with log weights."""
    values: dict[str, list[Tensor]] = {}
    log_weights = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        log_weights.append(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            deterministic = site["infer"].get("_deterministic", False)
            if deterministic or not site["is_observed"]:
                values.setdefault(name, []).append(site["value"])
    return {name: torch.stack(v) for name, v in values.items()}, torch.stack(log_weights)


def _as_numpy(tensor: Tensor) -> np.ndarray:
    return torch.as_tensor(tensor).detach().to("cpu", torch.float64).numpy()
