"""Baseline densities a flow must beat: a full-covariance Gaussian and a validated mixture.

The mixture is scikit-learn's, imported when :func:`mixture_loglik` is called: install it
with ``pip install 'pyroflows[baselines]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pyroflows._io import import_extra


def gaussian_loglik(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Log-density of each test row under the Gaussian fitted to the training rows (MLE).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> gaussian_loglik(rng.normal(size=(500, 2)), np.zeros((1, 2))).round(1)
        array([-1.8])
    """
    # In standardised units (columns of very different scales make the raw covariance look
    # singular to a solver), then back to the data's units by the log-det of the scaling.
    mean, scale = train.mean(0), train.std(0)
    chol = np.linalg.cholesky(np.atleast_2d(np.cov(((train - mean) / scale).T, bias=True)))
    solved = np.linalg.solve(chol, ((test - mean) / scale).T)
    dim = train.shape[1]
    log_norm = np.log(np.diag(chol)).sum() + np.log(scale).sum() + 0.5 * dim * np.log(2 * np.pi)
    return -0.5 * (solved**2).sum(0) - log_norm


def mixture_loglik(
    train: np.ndarray, test: np.ndarray, max_components: int = 10, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Log-density of each test row under a Gaussian mixture, and its number of components.

    The number of components (1 to ``max_components``, full covariances) is chosen by the
    log-likelihood of a held-out quarter of ``train``; the chosen mixture is then refitted
    on all of ``train``. Needs scikit-learn (``pip install 'pyroflows[baselines]'``); without
    it, an ``ImportError`` says so.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> data = np.concatenate([rng.normal(-5, 1, (300, 1)), rng.normal(5, 1, (300, 1))])
        >>> _, k = mixture_loglik(data, data[:5])
        >>> k >= 2  # two clusters need at least two components
        True
    """
    mixtures = import_extra(
        "sklearn.mixture",
        purpose="the Gaussian mixture baseline",
        package="scikit-learn",
        extra="baselines",
    )

    def mixture_of(k: int) -> Any:  # a fresh sklearn GaussianMixture
        return mixtures.GaussianMixture(
            k, covariance_type="full", reg_covar=1e-6, random_state=seed
        )

    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train))
    cut = len(train) // 4
    held, fit = train[order[:cut]], train[order[cut:]]
    scores = []
    for k in range(1, max_components + 1):
        if k > len(fit):
            break
        scores.append(mixture_of(k).fit(fit).score(held))
    best = int(np.argmax(scores)) + 1
    return mixture_of(best).fit(train).score_samples(test), best
