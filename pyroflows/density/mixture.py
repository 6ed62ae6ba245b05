r"""A Gaussian mixture in pure torch, fitted by EM, to serve as the base (latent) density of a
flow.

.. math:: \log p(x) = \operatorname{logsumexp}_k \left[\log \pi_k
    + \log \mathcal{N}(x; \mu_k, L_k L_k^\top)\right]

:class:`GaussianMixture` holds its parameters as buffers, so a flow's optimiser never sees
them, ``.to(...)`` moves them with the flow, and ``state_dict()`` saves them;
:func:`fit_gaussian_mixture` computes them from (standardised) data by expectation-maximisation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["COVARIANCES", "GaussianMixture", "fit_gaussian_mixture"]

COVARIANCES = ("full", "diag")

#: A component whose total responsibility is below this many rows is empty (re-seeded).
EMPTY = 1e-6

#: Lloyd iterations after the k-means++ seeding, at most (they stop once no row moves).
LLOYD = 10


def _check_covariance(covariance: str) -> None:
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")


def _check_count(name: str, value: int, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _component_log_prob(x: Tensor, log_weights: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    r""":math:`\log \pi_k + \log \mathcal{N}(x; \mu_k, L_k L_k^\top)`, shape ``(..., K)``.

    ``scale`` holds the factors :math:`L_k` ``(K, D, D)``, or only their diagonals ``(K, D)``
    for diagonal covariances. The Mahalanobis term is :math:`\|L_k^{-1}(x - \mu_k)\|^2`, one
    batched triangular solve of all rows against each factor (never a broadcast
    ``(N, K, D, D)`` copy).
    """
    batch, dim = x.shape[:-1], x.shape[-1]
    diff = x.reshape(-1, dim).T.unsqueeze(0) - loc.unsqueeze(-1)  # (K, D, N)
    if scale.ndim == 2:
        diagonal = scale
        z = diff / diagonal.unsqueeze(-1)
    else:
        diagonal = scale.diagonal(dim1=-2, dim2=-1)
        z = torch.linalg.solve_triangular(scale, diff, upper=False)
    maha = z.square().sum(-2)  # (K, N)
    log_norm = diagonal.log().sum(-1) + 0.5 * dim * math.log(2 * math.pi)  # (K,)
    out = log_weights.unsqueeze(-1) - log_norm.unsqueeze(-1) - 0.5 * maha
    return out.T.reshape(*batch, -1)


class GaussianMixture(torch.nn.Module):
    r"""A ``components``-component Gaussian mixture on :math:`\mathbb{R}^{dim}`,

    .. math:: \log p(x) = \operatorname{logsumexp}_k \left[\log \pi_k
        + \log \mathcal{N}(x; \mu_k, L_k L_k^\top)\right],
        \qquad \pi = \operatorname{softmax}(\text{logits}),

    with buffers ``logits`` ``(K,)``, ``loc`` ``(K, D)`` and ``scale_tril`` ``(K, D, D)``
    (lower-triangular Cholesky factors :math:`L_k` with positive diagonals; diagonal ones
    when ``covariance="diag"``). It starts as a standard normal whatever ``components``
    (uniform weights, zero means, identity factors); :meth:`set` or
    :func:`fit_gaussian_mixture` gives it fitted values. Buffers are not parameters: a flow
    trained on top of this base leaves them fixed, and ``state_dict()`` saves them.

    Its :meth:`log_prob` and :meth:`sample` take a ``context`` argument, as a flow's base
    does; this density is unconditional, so it must be ``None``.

    References:
        | Maximum Likelihood from Incomplete Data via the EM Algorithm
        | (Dempster, Laird and Rubin, 1977)
        | https://doi.org/10.1111/j.2517-6161.1977.tb01600.x

    Example:
        >>> mixture = GaussianMixture(3, 2)
        >>> mixture.log_prob(torch.zeros(4, 2)).shape
        torch.Size([4])
        >>> round(mixture.log_prob(torch.zeros(2)).item(), 4)  # standard normal at 0
        -1.8379
        >>> mixture.sample(5).shape
        torch.Size([5, 2])
    """

    logits: Tensor
    loc: Tensor
    scale_tril: Tensor

    def __init__(self, components: int, dim: int, covariance: str = "full") -> None:
        super().__init__()
        _check_count("components", components, 1)
        _check_count("dim", dim, 1)
        _check_covariance(covariance)
        self.components = components
        self.dim = dim
        self.covariance = covariance
        self.register_buffer("logits", torch.zeros(components))
        self.register_buffer("loc", torch.zeros(components, dim))
        self.register_buffer("scale_tril", torch.eye(dim).repeat(components, 1, 1))

    def extra_repr(self) -> str:
        return f"components={self.components}, dim={self.dim}, covariance={self.covariance!r}"

    def _check_input(self, x: Tensor, context: Tensor | None) -> None:
        if context is not None:
            raise ValueError("context must be None: a Gaussian mixture base is unconditional")
        if x.shape[-1:] != (self.dim,):
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")

    def component_log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log \pi_k + \log \mathcal{N}(x; \mu_k, L_k L_k^\top)` of each row of ``x``
        ``(..., D)`` and each component: shape ``(..., K)``."""
        self._check_input(x, None)
        log_weights = torch.log_softmax(self.logits, -1)
        scale = self.scale_tril
        if self.covariance == "diag":
            scale = scale.diagonal(dim1=-2, dim2=-1)
        return _component_log_prob(x, log_weights, self.loc, scale)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        r""":math:`\log p(x)` of each row of ``x`` ``(..., D)``: shape ``(...)``."""
        self._check_input(x, context)
        return torch.logsumexp(self.component_log_prob(x), -1)

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        r"""``n`` draws ``(n, D)``: :math:`k \sim \pi`, then :math:`x = \mu_k + L_k
        \varepsilon` with :math:`\varepsilon \sim \mathcal{N}(0, I)`, from torch's global
        generator on the buffers' device."""
        if context is not None:
            raise ValueError("context must be None: a Gaussian mixture base is unconditional")
        _check_count("n", n, 0)
        if n == 0:
            return self.loc.new_zeros(0, self.dim)
        weights = torch.softmax(self.logits, -1)
        k = torch.multinomial(weights, n, replacement=True)
        eps = torch.randn(n, self.dim, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc[k] + (self.scale_tril[k] @ eps.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def set(self, logits: Tensor, loc: Tensor, scale_tril: Tensor) -> None:
        """Copy ``logits`` ``(K,)``, ``loc`` ``(K, D)`` and ``scale_tril`` ``(K, D, D)`` into
        the buffers (cast to their dtype and device). ``scale_tril`` must be lower-triangular
        with a positive diagonal, and diagonal for ``covariance="diag"``."""
        k, d = self.components, self.dim
        for name, value, shape in (
            ("logits", logits, (k,)),
            ("loc", loc, (k, d)),
            ("scale_tril", scale_tril, (k, d, d)),
        ):
            if tuple(value.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite")
        diagonal = scale_tril.diagonal(dim1=-2, dim2=-1)
        if self.covariance == "full":
            shape, off = "lower-triangular", scale_tril.triu(1)
        else:
            shape, off = "diagonal", scale_tril - torch.diag_embed(diagonal)
        if (off != 0).any():
            raise ValueError(f"scale_tril must be {shape} for covariance={self.covariance!r}")
        if (diagonal <= 0).any():
            raise ValueError("scale_tril must have a positive diagonal")
        self.logits.copy_(logits)
        self.loc.copy_(loc)
        self.scale_tril.copy_(scale_tril)


def _draw(weights: Tensor, generator: torch.Generator | None) -> int:
    """One index drawn with probability proportional to ``weights``, from ``generator``."""
    if generator is not None and generator.device != weights.device:
        weights = weights.to(generator.device)
    return int(torch.multinomial(weights, 1, generator=generator))


def _squared_distances(x: Tensor, centres: Tensor) -> Tensor:
    """``||x_n - c_k||^2``, shape ``(N, K)``, clamped at 0 against rounding."""
    cross = x @ centres.T
    return (x.square().sum(-1, keepdim=True) - 2 * cross + centres.square().sum(-1)).clamp_min(0)


def _kmeans(x: Tensor, components: int, generator: torch.Generator | None) -> Tensor:
    """Nearest-centre assignments ``(N,)`` after k-means++ seeding and a few Lloyd steps."""
    n = len(x)
    centres = x.new_empty(components, x.shape[1])
    centres[0] = x[_draw(x.new_ones(n), generator)]
    nearest = (x - centres[0]).square().sum(-1)
    for k in range(1, components):
        weights = nearest if nearest.sum() > 0 else x.new_ones(n)  # all rows on a centre
        centres[k] = x[_draw(weights, generator)]
        nearest = torch.minimum(nearest, (x - centres[k]).square().sum(-1))
    labels = _squared_distances(x, centres).argmin(-1)
    for _ in range(LLOYD):
        one_hot = torch.nn.functional.one_hot(labels, components).to(x.dtype)
        counts = one_hot.sum(0)
        centres = torch.where(
            counts.unsqueeze(-1) > 0, (one_hot.T @ x) / counts.clamp_min(1).unsqueeze(-1), centres
        )
        distances = _squared_distances(x, centres)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):  # an empty cluster takes the rows farthest from their centres
            far = distances.gather(-1, labels.unsqueeze(-1)).squeeze(-1).topk(len(empty)).indices
            centres[empty] = x[far]
            distances = _squared_distances(x, centres)
        new = distances.argmin(-1)
        if len(empty) == 0 and torch.equal(new, labels):
            break
        labels = new
    return labels


def _m_step(x: Tensor, resp: Tensor, ridge: float, diag: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Log-weights, means and Cholesky factors (their diagonals ``(K, D)`` if ``diag``) from
    responsibilities ``resp`` ``(N, K)``; ``x`` is float64."""
    n, dim = x.shape
    # An empty component (possible after k-means only) gets a finite, negligible weight
    # here and is re-seeded after the next E-step.
    mass = resp.sum(0).clamp_min(torch.finfo(x.dtype).tiny)  # (K,)
    log_weights = mass.log() - math.log(n)
    loc = (resp.T @ x) / mass.unsqueeze(-1)
    if diag:  # E[x^2] - E[x]^2 cancels little in float64 on standardised rows
        var = (resp.T @ x.square()) / mass.unsqueeze(-1) - loc.square()
        scale = (var.clamp_min(0) + ridge).sqrt()
        singular = (scale == 0).any()
    else:
        weighted = resp.T.sqrt().unsqueeze(-1) * (x.unsqueeze(0) - loc.unsqueeze(1))  # (K, N, D)
        cov = weighted.mT @ weighted / mass.view(-1, 1, 1)
        cov = cov + ridge * torch.eye(dim, dtype=x.dtype, device=x.device)
        scale, info = torch.linalg.cholesky_ex(cov)
        singular = (info > 0).any()
    if singular:
        raise ValueError(
            "a component's covariance is singular (its rows span a subspace?): "
            f"increase ridge (now {ridge})"
        )
    return log_weights, loc, scale


def _em(
    x: Tensor,
    params: tuple[Tensor, Tensor, Tensor],
    diag: bool,
    iterations: int,
    tolerance: float,
    ridge: float,
) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
    """One EM run from ``params`` (log-weights, means, factors): (mean training
    log-likelihood, parameters)."""
    previous, score, reseeded = -math.inf, None, False
    for _ in range(iterations):
        log_joint = _component_log_prob(x, *params)
        rows = torch.logsumexp(log_joint, -1)
        score = rows.mean().item()
        if not reseeded and score - previous < tolerance:
            break
        previous, score = score, None
        resp = (log_joint - rows.unsqueeze(-1)).exp()
        empty = (resp.sum(0) < EMPTY).nonzero().flatten()
        reseeded = len(empty) > 0
        if reseeded:  # each empty component takes one of the rows explained worst
            worst = rows.topk(len(empty), largest=False).indices
            resp[worst] = 0
            resp[worst, empty] = 1
        params = _m_step(x, resp, ridge, diag)
    if score is None:  # stopped by `iterations`: score the last M-step
        score = torch.logsumexp(_component_log_prob(x, *params), -1).mean().item()
    return score, params


def _kmeans_start(
    x: Tensor, components: int, ridge: float, diag: bool, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The parameters of one M-step from the one-hot assignments of :func:`_kmeans`."""
    labels = _kmeans(x, components, generator)
    return _m_step(x, torch.nn.functional.one_hot(labels, components).to(x.dtype), ridge, diag)


def _start_from(
    mixture: GaussianMixture, components: int, covariance: str, x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``mixture``'s parameters in float64 on ``x``'s device, checked against the fit's."""
    if not isinstance(mixture, GaussianMixture):
        raise ValueError(f"start must be a GaussianMixture, got {type(mixture).__name__}")
    if (mixture.components, mixture.dim, mixture.covariance) != (
        components,
        x.shape[1],
        covariance,
    ):
        raise ValueError(
            f"start has {mixture.components} components of dim {mixture.dim} with "
            f"{mixture.covariance!r} covariance; the fit asks for {components} of dim "
            f"{x.shape[1]} with {covariance!r}"
        )
    scale = mixture.scale_tril.to(x)
    if covariance == "diag":
        scale = scale.diagonal(dim1=-2, dim2=-1)
    return torch.log_softmax(mixture.logits.to(x), -1), mixture.loc.to(x), scale


def fit_gaussian_mixture(
    x: Tensor,
    components: int,
    covariance: str = "full",
    *,
    iterations: int = 200,
    tolerance: float = 1e-5,
    ridge: float = 1e-3,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    start: GaussianMixture | None = None,
) -> GaussianMixture:
    r"""The :class:`GaussianMixture` fitted to the rows of ``x`` ``(N, D)`` by EM.

    **Start.** k-means++ seeds the means (the first one a uniform row, each next one a row
    drawn with probability proportional to its squared distance to the nearest mean so far,
    :math:`D^2` sampling from ``generator``); up to 10 Lloyd iterations refine them; the
    rows' one-hot nearest-mean assignments are the first responsibilities.

    **EM.** The M-step computes, from responsibilities :math:`r_{nk}` and
    :math:`N_k = \sum_n r_{nk}`,

    .. math:: \pi_k = \frac{N_k}{N}, \quad
        \mu_k = \frac{1}{N_k} \sum_n r_{nk} x_n, \quad
        \Sigma_k = \frac{1}{N_k} \sum_n r_{nk} (x_n - \mu_k)(x_n - \mu_k)^\top + \lambda I

    (only its diagonal for ``covariance="diag"``) and :math:`L_k = \operatorname{chol}
    \Sigma_k`; the E-step then computes

    .. math:: r_{nk} = \frac{\pi_k \mathcal{N}(x_n; \mu_k, \Sigma_k)}
        {\sum_j \pi_j \mathcal{N}(x_n; \mu_j, \Sigma_j)}

    and the mean log-likelihood :math:`\frac1N \sum_n \log p(x_n)`. EM stops when that mean
    improves by less than ``tolerance`` nats, or after ``iterations`` M-steps. All in float64
    on ``x``'s device; the result has ``x``'s dtype and device.

    **Ridge.** :math:`\lambda` = ``ridge`` is absolute: ``x`` is assumed standardised (zero
    mean, unit variances, as a density estimator's rows are), so it is a fixed fraction of
    the data's scale and bounds every component's density away from a collapse onto few rows.

    **Empty components.** A component whose total responsibility :math:`N_k` falls below
    ``1e-6`` rows is re-seeded rather than left to die: it takes the row the mixture
    explains worst (one row per empty component) as its only member for the next M-step,
    i.e. its mean at that row, covariance :math:`\lambda I`, weight :math:`1/N`.

    **Restarts.** EM runs from ``restarts`` k-means++ starts; the fit with the best mean
    training log-likelihood is kept. ``start`` (a mixture with ``components`` components
    and this ``covariance``, e.g. one fitted to a subset of the rows) replaces them: one EM
    run from its parameters, which converges in a few iterations where the start is good.

    References:
        | Maximum Likelihood from Incomplete Data via the EM Algorithm
        | (Dempster, Laird and Rubin, 1977)
        | https://doi.org/10.1111/j.2517-6161.1977.tb01600.x

        | k-means++: The Advantages of Careful Seeding
        | (Arthur and Vassilvitskii, 2007)
        | https://dl.acm.org/doi/10.5555/1283383.1283494

    Example:
        >>> generator = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(500, 2, generator=generator) - 3,
        ...                torch.randn(500, 2, generator=generator) + 3])
        >>> mixture = fit_gaussian_mixture(x, 2, generator=generator)
        >>> mixture.loc[:, 0].sort().values.round()
        tensor([-3.,  3.])
        >>> mixture.logits.softmax(-1).round(decimals=1)
        tensor([0.5000, 0.5000])
        >>> mixture.log_prob(x).shape
        torch.Size([1000])
    """
    _check_count("components", components, 1)
    _check_covariance(covariance)
    _check_count("iterations", iterations, 1)
    _check_count("restarts", restarts, 1)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"x must be 2-D (rows, columns), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
    if len(x) < components:
        raise ValueError(f"x must have at least components={components} rows, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError("x must be finite (it has NaN or infinite values)")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    if not (math.isfinite(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")

    data = x.detach().to(torch.float64)
    diag = covariance == "diag"
    if start is None:
        starts = (_kmeans_start(data, components, ridge, diag, generator) for _ in range(restarts))
    else:
        starts = [_start_from(start, components, covariance, data)]
    fits = (_em(data, params, diag, iterations, tolerance, ridge) for params in starts)
    _, (log_weights, loc, scale) = max(fits, key=lambda fit: fit[0])
    if diag:
        scale = torch.diag_embed(scale)
    mixture = GaussianMixture(components, x.shape[1], covariance).to(x.device, x.dtype)
    mixture.set(log_weights, loc, scale)
    return mixture
