"""Reference posteriors from posteriordb, with Pyro ports of their models.

Each posterior comes with its data, a Pyro model (a closure over the data, taking no
arguments) and the reference draws (10 chains x 1000 draws, on the constrained scale). Every
quantity in the draws is a ``pyro.sample`` or ``pyro.deterministic`` site of the model with
the same name and shape, so a guide's samples can be compared with the draws site by site.

    from posteriordb import POSTERIORS, load

    post = load("eight_schools-eight_schools_noncentered")
    post.model()  # a Pyro model; post.reference["theta"].shape == (10000, 8)

The models follow ``MODELS.md`` of the posteriordb folder (``$POSTERIORDB`` if set, else
``../shared/posteriordb`` beside the repository). Flat (improper) priors are
:class:`FlatPrior` sites, an ``ImproperUniform`` that Pyro's initialisation strategies can
trace. The models expect unbatched latent values (no ``vectorize_particles``).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import transform_to

DEFAULT_ROOT: Path = (
    Path(os.environ["POSTERIORDB"])
    if os.environ.get("POSTERIORDB")
    else Path(__file__).resolve().parents[1].parent / "shared" / "posteriordb"
)

Data = dict[str, np.ndarray]
Tensorise = Callable[[Any], torch.Tensor]
Builder = Callable[[Data, Tensorise], Callable[[], None]]


@dataclass
class Posterior:
    """A posterior: its Pyro model, reference draws by site name, and the number of scalars."""

    name: str
    model: Callable[[], None]
    reference: dict[str, np.ndarray]
    dim: int


class FlatPrior(dist.ImproperUniform):
    """An improper uniform prior (log density 0) on ``support``.

    Unlike Pyro's ``ImproperUniform`` it can be "sampled": ``sample`` returns the fixed point
    ``transform_to(support)(0)``, not a random draw, so that initialisation strategies such as
    ``init_to_feasible`` and ``init_to_median`` (and autoguides built on them) can trace a
    model that uses it. The support may depend on other latent values.
    """

    def __init__(
        self,
        support: constraints.Constraint,
        batch_shape: Sequence[int] = (),
        event_shape: Sequence[int] = (),
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        self._dtype = dtype
        self._device = torch.device(device)
        super().__init__(support, torch.Size(batch_shape), torch.Size(event_shape))

    def expand(self, batch_shape, _instance=None) -> FlatPrior:
        new = self._get_checked_instance(FlatPrior, _instance)
        new._dtype, new._device = self._dtype, self._device
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        zero = torch.zeros(shape, dtype=self._dtype, device=self._device)
        return transform_to(self.support)(zero).detach()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(
            value.shape[: value.dim() - self.event_dim], self.batch_shape
        )
        return torch.zeros(shape, dtype=value.dtype, device=value.device)


# ----------------------------------------------------------------------------- models


def _subdiagonal(n: int, t: Tensorise) -> torch.Tensor:
    return t(np.eye(n, k=-1))


def eight_schools_noncentered(data: Data, t: Tensorise) -> Callable[[], None]:
    """theta_trans ~ N(0,1), mu ~ N(0,5), tau ~ Cauchy+(0,5), theta = mu + tau theta_trans,
    y ~ N(theta, sigma)."""
    y, sigma = t(data["y"]), t(data["sigma"])

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(t(0.0), t(5.0)))
        tau = pyro.sample("tau", dist.HalfCauchy(t(5.0)))
        with pyro.plate("schools", len(y)):
            theta_trans = pyro.sample("theta_trans", dist.Normal(t(0.0), t(1.0)))
            theta = pyro.deterministic("theta", mu + tau * theta_trans)
            pyro.sample("y", dist.Normal(theta, sigma), obs=y)

    return model


def diamonds(data: Data, t: Tensorise) -> Callable[[], None]:
    """b ~ N(0,1), Intercept ~ t3(8,10), sigma ~ t3+(0,10), Y ~ N(Intercept + Xc b, sigma)
    with Xc the columns 2..K of X, centred."""
    x = data["X"][:, 1:]
    xc, y = t(x - x.mean(0)), t(data["Y"])

    def model() -> None:
        b = pyro.sample("b", dist.Normal(t(0.0), t(1.0)).expand([xc.shape[1]]).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(t(3.0), t(8.0), t(10.0)))
        sigma = pyro.sample(
            "sigma", dist.FoldedDistribution(dist.StudentT(t(3.0), t(0.0), t(10.0)))
        )
        with pyro.plate("data", len(y)):
            pyro.sample("Y", dist.Normal(intercept + xc @ b, sigma), obs=y)

    return model


def ark(data: Data, t: Tensorise) -> Callable[[], None]:
    """AR(K): alpha, beta_k ~ N(0,10), sigma ~ Cauchy+(0,2.5),
    y_t ~ N(alpha + sum_k beta_k y_{t-k}, sigma) for t > K."""
    y, k = data["y"], int(data["K"])
    n = len(y)
    lags = t(np.stack([y[k - j : n - j] for j in range(1, k + 1)], axis=1))
    target = t(y[k:])

    def model() -> None:
        alpha = pyro.sample("alpha", dist.Normal(t(0.0), t(10.0)))
        beta = pyro.sample("beta", dist.Normal(t(0.0), t(10.0)).expand([k]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(t(2.5)))
        with pyro.plate("time", n - k):
            pyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=target)

    return model


def arma11(data: Data, t: Tensorise) -> Callable[[], None]:
    """ARMA(1,1): mu ~ N(0,10), phi, theta ~ N(0,2), sigma ~ Cauchy+(0,2.5);
    err_t = y_t - mu - phi y_{t-1} - theta err_{t-1} (y_0 = mu, err_0 = 0), err ~ N(0, sigma)."""
    y = t(data["y"])
    n = len(y)
    eye, sub = t(np.eye(n)), _subdiagonal(n, t)

    def model() -> None:
        mu = pyro.sample("mu", dist.Normal(t(0.0), t(10.0)))
        phi = pyro.sample("phi", dist.Normal(t(0.0), t(2.0)))
        theta = pyro.sample("theta", dist.Normal(t(0.0), t(2.0)))
        sigma = pyro.sample("sigma", dist.HalfCauchy(t(2.5)))
        previous = torch.cat([mu.reshape(1), y[:-1]])
        # err_t + theta err_{t-1} = y_t - mu - phi y_{t-1}: the recursion as a
        # lower-bidiagonal solve (forward substitution is the recursion itself).
        shock = (y - mu - phi * previous).unsqueeze(-1)
        err = torch.linalg.solve_triangular(eye + theta * sub, shock, upper=False).squeeze(-1)
        with pyro.plate("time", n):
            pyro.sample("err", dist.Normal(t(0.0), sigma), obs=err)

    return model


def garch11(data: Data, t: Tensorise) -> Callable[[], None]:
    """GARCH(1,1), flat priors: s_1 = sigma1, s_t^2 = alpha0 + alpha1 (y_{t-1} - mu)^2
    + beta1 s_{t-1}^2, y_t ~ N(mu, s_t); beta1 in (0, 1 - alpha1)."""
    y, sigma1 = t(data["y"]), t(data["sigma1"])
    n = len(y)
    eye, sub = t(np.eye(n)), _subdiagonal(n, t)
    flat = dict(dtype=y.dtype, device=y.device)

    def model() -> None:
        mu = pyro.sample("mu", FlatPrior(constraints.real, **flat))
        alpha0 = pyro.sample("alpha0", FlatPrior(constraints.positive, **flat))
        alpha1 = pyro.sample("alpha1", FlatPrior(constraints.interval(0.0, 1.0), **flat))
        beta1 = pyro.sample("beta1", FlatPrior(constraints.interval(0.0, 1.0 - alpha1), **flat))
        # s_t^2 - beta1 s_{t-1}^2 = alpha0 + alpha1 (y_{t-1} - mu)^2: a bidiagonal solve.
        drive = torch.cat([(sigma1**2).reshape(1), alpha0 + alpha1 * (y[:-1] - mu) ** 2])
        variance = torch.linalg.solve_triangular(
            eye - beta1 * sub, drive.unsqueeze(-1), upper=False
        ).squeeze(-1)
        with pyro.plate("time", n):
            pyro.sample("y", dist.Normal(mu, variance.sqrt()), obs=y)

    return model


def _squared_exponential(x: torch.Tensor, alpha: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2))."""
    return alpha**2 * torch.exp(-((x[:, None] - x[None, :]) ** 2) / (2 * rho**2))


def gp_pois_regr(data: Data, t: Tensorise) -> Callable[[], None]:
    """rho ~ Gamma(25, rate 4), alpha ~ N+(0,2), f_tilde ~ N(0,I), f = chol(K + 1e-10 I) f_tilde,
    k ~ Poisson(exp(f)), K squared-exponential."""
    x, k = t(data["x"]), t(data["k"])
    n = len(x)
    jitter = t(1e-10 * np.eye(n))

    def model() -> None:
        rho = pyro.sample("rho", dist.Gamma(t(25.0), t(4.0)))
        alpha = pyro.sample("alpha", dist.HalfNormal(t(2.0)))
        f_tilde = pyro.sample("f_tilde", dist.Normal(t(0.0), t(1.0)).expand([n]).to_event(1))
        chol = torch.linalg.cholesky(_squared_exponential(x, alpha, rho) + jitter)
        f = pyro.deterministic("f", chol @ f_tilde)
        with pyro.plate("data", n):
            pyro.sample("k", dist.Poisson(f.exp()), obs=k)

    return model


def gp_regr(data: Data, t: Tensorise) -> Callable[[], None]:
    """rho ~ Gamma(25, rate 4), alpha ~ N+(0,2), sigma ~ N+(0,1), y ~ MVN(0, K + sigma I)."""
    x, y = t(data["x"]), t(data["y"])
    eye = t(np.eye(len(x)))

    def model() -> None:
        rho = pyro.sample("rho", dist.Gamma(t(25.0), t(4.0)))
        alpha = pyro.sample("alpha", dist.HalfNormal(t(2.0)))
        sigma = pyro.sample("sigma", dist.HalfNormal(t(1.0)))
        cov = _squared_exponential(x, alpha, rho) + sigma * eye
        pyro.sample("y", dist.MultivariateNormal(torch.zeros_like(y), cov), obs=y)

    return model


def _regression(
    design: np.ndarray,
    response: np.ndarray,
    name: str,
    t: Tensorise,
    sigma_prior: dist.Distribution | None = None,
) -> Callable[[], None]:
    """Flat beta, sigma ~ sigma_prior (flat on sigma > 0 if None),
    response ~ N(design beta, sigma)."""
    x, y = t(design), t(response)
    flat = dict(dtype=y.dtype, device=y.device)

    def model() -> None:
        beta = pyro.sample("beta", FlatPrior(constraints.real, (), (x.shape[1],), **flat))
        prior = FlatPrior(constraints.positive, **flat) if sigma_prior is None else sigma_prior
        sigma = pyro.sample("sigma", prior)
        with pyro.plate("data", len(y)):
            pyro.sample(name, dist.Normal(x @ beta, sigma), obs=y)

    return model


def kidscore_interaction(data: Data, t: Tensorise) -> Callable[[], None]:
    """Flat beta, sigma ~ Cauchy+(0,2.5),
    kid_score ~ N(b1 + b2 mom_hs + b3 mom_iq + b4 mom_hs mom_iq, sigma)."""
    hs, iq = data["mom_hs"], data["mom_iq"]
    design = np.stack([np.ones_like(iq), hs, iq, hs * iq], axis=1)
    return _regression(design, data["kid_score"], "kid_score", t, dist.HalfCauchy(t(2.5)))


def logmesquite_logvas(data: Data, t: Tensorise) -> Callable[[], None]:
    """Flat beta and sigma > 0, log weight ~ N(b1 + b2 log(d1 d2 h_c) + b3 log(d1 d2)
    + b4 log(d1/d2) + b5 log h_t + b6 log density + b7 group, sigma)."""
    d1, d2 = data["diam1"], data["diam2"]
    columns = [
        np.ones_like(d1),
        np.log(d1 * d2 * data["canopy_height"]),
        np.log(d1 * d2),
        np.log(d1 / d2),
        np.log(data["total_height"]),
        np.log(data["density"]),
        data["group"],
    ]
    return _regression(np.stack(columns, axis=1), np.log(data["weight"]), "log_weight", t)


def nes(data: Data, t: Tensorise) -> Callable[[], None]:
    """Flat beta and sigma > 0, partyid7 ~ N(b1 + b2 real_ideo + b3 race_adj + b4..b6 [age=2,3,4]
    + b7 educ1 + b8 gender + b9 income, sigma)."""
    age = data["age_discrete"]
    columns = [
        np.ones(len(age)),
        data["real_ideo"],
        data["race_adj"],
        age == 2,
        age == 3,
        age == 4,
        data["educ1"],
        data["gender"],
        data["income"],
    ]
    return _regression(np.stack(columns, axis=1), data["partyid7"], "partyid7", t)


def low_dim_gauss_mix(data: Data, t: Tensorise) -> Callable[[], None]:
    """mu ordered with mu ~ N(0,2), sigma ~ N+(0,2), theta ~ Beta(5,5),
    y ~ theta N(mu_1, sigma_1) + (1 - theta) N(mu_2, sigma_2)."""
    y = t(data["y"])

    def model() -> None:
        mu = pyro.sample(
            "mu", FlatPrior(constraints.ordered_vector, (), (2,), dtype=y.dtype, device=y.device)
        )
        pyro.factor("mu_prior", dist.Normal(t(0.0), t(2.0)).log_prob(mu).sum())
        sigma = pyro.sample("sigma", dist.HalfNormal(t(2.0)).expand([2]).to_event(1))
        theta = pyro.sample("theta", dist.Beta(t(5.0), t(5.0)))
        weights = dist.Categorical(probs=torch.stack([theta, 1 - theta]))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.MixtureSameFamily(weights, dist.Normal(mu, sigma)), obs=y)

    return model


def blr(data: Data, t: Tensorise) -> Callable[[], None]:
    """beta ~ N(0,10), sigma ~ N+(0,10), y ~ N(X beta, sigma)."""
    x, y = t(data["X"]), t(data["y"])

    def model() -> None:
        beta = pyro.sample("beta", dist.Normal(t(0.0), t(10.0)).expand([x.shape[1]]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(t(10.0)))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(x @ beta, sigma), obs=y)

    return model


_BUILDERS: dict[str, Builder] = {
    "eight_schools-eight_schools_noncentered": eight_schools_noncentered,
    "diamonds-diamonds": diamonds,
    "arK-arK": ark,
    "arma-arma11": arma11,
    "garch-garch11": garch11,
    "gp_pois_regr-gp_pois_regr": gp_pois_regr,
    "gp_pois_regr-gp_regr": gp_regr,
    "kidiq-kidscore_interaction": kidscore_interaction,
    "mesquite-logmesquite_logvas": logmesquite_logvas,
    "nes2000-nes": nes,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "sblrc-blr": blr,
}

POSTERIORS: list[str] = list(_BUILDERS)


# ----------------------------------------------------------------------------- files


def _read_zipped_json(path: Path) -> Any:
    with zipfile.ZipFile(path) as archive:
        (member,) = archive.namelist()
        return json.loads(archive.read(member))


_INDEXED = re.compile(r"^(?P<base>[^\[\]]+)(?:\[(?P<index>[0-9, ]+)\])?$")


def read_reference(path: Path) -> dict[str, np.ndarray]:
    """Reference draws by parameter, chains concatenated: ``theta[1]..theta[8]`` become one
    array of shape ``(n_draws, 8)`` in index order, a scalar parameter one of shape ``(n,)``."""
    chains = _read_zipped_json(path)
    pieces: dict[str, dict[tuple[int, ...], np.ndarray]] = {}
    for key in chains[0]:
        match = _INDEXED.match(key)
        if match is None:
            raise ValueError(f"{path}: cannot parse parameter name {key!r}")
        index = match["index"]
        position = tuple(int(i) - 1 for i in index.split(",")) if index else ()
        draws = np.concatenate([np.asarray(chain[key], dtype=np.float64) for chain in chains])
        pieces.setdefault(match["base"], {})[position] = draws
    reference = {}
    for base, parts in pieces.items():
        shape = tuple(max(p[d] for p in parts) + 1 for d in range(len(next(iter(parts)))))
        if len(parts) != math.prod(shape):
            raise ValueError(f"{path}: {base} has {len(parts)} of {math.prod(shape)} entries")
        n = len(next(iter(parts.values())))
        array = np.empty((n, *shape))
        for position, draws in parts.items():
            array[(slice(None), *position)] = draws
        reference[base] = array
    return reference


def load(
    name: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    root: Path | None = None,
) -> Posterior:
    """The posterior ``name`` (one of :data:`POSTERIORS`): Pyro model, reference draws, dim."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown posterior {name!r}; supported: {', '.join(POSTERIORS)}")
    base = Path(root if root is not None else DEFAULT_ROOT) / "posterior_database"
    info = json.loads((base / "posteriors" / f"{name}.json").read_text())
    raw = _read_zipped_json(base / "data" / "data" / f"{info['data_name']}.json.zip")
    data = {key: np.asarray(value) for key, value in raw.items()}
    reference = read_reference(
        base / "reference_posteriors" / "draws" / "draws" / f"{name}.json.zip"
    )
    sizes = {key: math.prod(value.shape[1:]) for key, value in reference.items()}
    if sizes != info["dimensions"]:
        raise ValueError(f"{name}: draws hold {sizes}, posterior says {info['dimensions']}")

    def tensorise(value: Any) -> torch.Tensor:
        return torch.as_tensor(np.asarray(value, dtype=np.float64), dtype=dtype, device=device)

    model = _BUILDERS[name](data, tensorise)
    return Posterior(name, model, reference, sum(sizes.values()))
