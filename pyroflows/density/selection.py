r"""The baselines a fitted density is measured against, chosen on the validation rows.

:func:`choose_mixture` fits Gaussian mixtures to the standardised training rows, with
:math:`K = 1, 2, \dots` components and full or diagonal covariances, and scores each on
the validation rows exactly as the final model is scored (in the data's units, discrete
columns integrated over their bins). The mixture with :math:`K = 1` is the Gaussian fitted
to the rows (:func:`fitted_gaussian`). For each covariance type the search
stops after ``patience`` values of :math:`K` in a row without a better validation score,
or at ``max_components``; each covariance gets a ridge of ``RIDGES[0]`` on its diagonal
(the rows are standardised, so a ridge is a fraction of their variance). The winner is then
refitted with each other ridge of :data:`RIDGES` (EM started from the winner), and the best
of all is chosen. On more than :data:`SEARCH_ROWS` rows the search runs on a random subset
of that many, and its winner is refitted to all rows by EM started from itself (kept if it
scores better).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pyroflows.density.mixture import COVARIANCES, GaussianMixture, fit_gaussian_mixture
from pyroflows.density.tabular import TabularDensity, gaussian_moments
from pyroflows.density.training import evaluate

#: EM starts per mixture
RESTARTS = 3
#: EM iterations of the winner's refit to all rows, from itself (on 80,000 rows of a 10-D
#: table, 10 to 20 iterations scored best on validation rows, and 200 cost 19 s)
REFIT_ITERATIONS = 50
#: ridges added to each covariance (of standardised rows): the first in the search over
#: components and covariance types, the others then tried on the winner
RIDGES = (1e-3, 1e-4, 1e-2, 3e-2, 1e-1)
#: the search fits its mixtures to at most this many rows (a random subset), and refits the
#: winner to all of them, from itself: EM on 80,000 rows from k-means++ costs about 16 s a
#: start on 2 cores (5,000 rows cost the 8-D mixture benchmark KL 0.018 against 0.011 from
#: all its 12,800)
SEARCH_ROWS = 15_000


@dataclass
class MixtureSearch:
    """The outcome of :func:`choose_mixture`: the Gaussian (``K = 1``, full covariance),
    the best mixture (and its ridge), and every ``(components, covariance, ridge,
    valid_nats)`` tried, where ``valid_nats`` is the mean validation log-likelihood in nats
    per row."""

    gaussian: GaussianMixture
    gaussian_score: float
    best: GaussianMixture
    best_ridge: float
    best_score: float
    tried: list[tuple[int, str, float, float]] = field(default_factory=list)


def choose_mixture(
    maps: TabularDensity,
    latent: Tensor,
    valid: Tensor,
    *,
    valid_context: Tensor | None = None,
    max_components: int = 10,
    patience: int = 2,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> MixtureSearch:
    """Fit mixtures to the training rows' ``latent`` values (``maps.latent`` of them,
    discrete columns dequantised with draws of uniform noise) and choose the best by the
    validation score of ``maps`` over each.

    ``maps`` holds the preprocessing (column maps and standardisation, already started on
    the training rows); ``valid`` are raw rows, and ``valid_context`` the validation rows'
    contexts for a conditional ``maps`` (a mixture ignores them: it is the
    marginal density of the rows). ``progress`` shows a bar over the mixtures (its total is
    every mixture the search may fit; one that stops early leaves it short).

    Example:
        >>> from pyroflows.density.schema import Column
        >>> _ = torch.manual_seed(0)
        >>> rows = torch.cat([torch.randn(300, 1) - 4, torch.randn(300, 1) + 4])
        >>> rows = rows[torch.randperm(600)]
        >>> maps = TabularDensity([Column("x", "float64")], GaussianMixture(1, 1))
        >>> maps.initialize(rows[:450])
        >>> search = choose_mixture(maps, maps.latent(rows[:450]), rows[450:])
        >>> search.best.components >= 2, search.best_score > search.gaussian_score
        (True, True)
    """
    gaussian = fitted_gaussian(latent)
    gaussian_score = _score(maps, gaussian, valid, valid_context)
    tried = [(1, "full", 0.0, gaussian_score)]
    found = [(gaussian, 0.0, gaussian_score)]
    rows = latent
    if len(latent) > SEARCH_ROWS:
        rows = latent[torch.randperm(len(latent), device=latent.device)[:SEARCH_ROWS]]
    largest = min(max_components, len(rows) // 2)
    bar = tqdm(
        total=len(COVARIANCES) * max(0, largest - 1) + len(RIDGES) - 1 + (rows is not latent),
        disable=not progress,
        desc="mixtures",
        unit="fit",
    )

    def attempt(
        k: int,
        covariance: str,
        ridge: float,
        start: GaussianMixture | None = None,
        data: Tensor = rows,
    ) -> float:
        mixture = fit_gaussian_mixture(
            data,
            k,
            covariance,
            ridge=ridge,
            iterations=200 if data is rows else REFIT_ITERATIONS,
            restarts=RESTARTS,
            generator=generator,
            start=start,
        )
        score = _score(maps, mixture, valid, valid_context)
        tried.append((k, covariance, ridge, score))
        found.append((mixture, ridge, score))
        bar.update()
        bar.set_postfix(k=k, covariance=covariance, ridge=ridge, valid=f"{score:.4f}")
        return score

    for covariance in COVARIANCES:
        best, stale = gaussian_score, 0
        for k in range(2, largest + 1):
            score = attempt(k, covariance, RIDGES[0])
            if score > best:
                best, stale = score, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    winner = max(found, key=lambda entry: entry[-1])[0]  # the first of ties
    if winner.components > 1:  # other ridges, by EM from the winner
        for ridge in RIDGES[1:]:
            attempt(winner.components, winner.covariance, ridge, start=winner)
    if rows is not latent:  # the winner, refitted to every row by EM from itself
        winner, ridge = max(found, key=lambda entry: entry[-1])[:2]
        if winner.components > 1:
            attempt(winner.components, winner.covariance, ridge, start=winner, data=latent)
    bar.close()
    best_mixture, best_ridge, best_score = max(found, key=lambda entry: entry[-1])
    return MixtureSearch(gaussian, gaussian_score, best_mixture, best_ridge, best_score, tried)


def fitted_gaussian(u: Tensor) -> GaussianMixture:
    """The Gaussian fitted to the rows ``u`` (mean, and unbiased covariance with a ridge of
    ``1e-6`` times the mean variance), as a one-component mixture.

    Example:
        >>> u = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 4.0]])
        >>> fitted_gaussian(u).loc
        tensor([[1., 2.]])
    """
    mean, chol = gaussian_moments(u)
    gaussian = GaussianMixture(1, u.shape[-1]).to(device=u.device, dtype=u.dtype)
    gaussian.set(torch.zeros_like(mean[:1]), mean.unsqueeze(0), chol.unsqueeze(0))
    return gaussian


def _score(
    maps: TabularDensity, mixture: GaussianMixture, valid: Tensor, context: Tensor | None
) -> float:
    """Mean validation log-likelihood of ``maps`` over ``mixture``, nats per row."""
    return -evaluate(maps.with_density(mixture).eval(), valid, context=context)
