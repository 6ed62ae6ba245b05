r"""Flow guides for Pyro models: every registered flow family as an autoguide."""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import get_plates
from torch import Tensor, nn
from torch.distributions import constraints, register_kl, transform_to

from pyroflows._checks import check_positive_float, check_positive_int
from pyroflows.distributions import FlowDistribution
from pyroflows.inference.bounds import FlowMixture
from pyroflows.inference.start import STARTS, GaussianStart, distinct_starts
from pyroflows.inference.vi import posterior_flow, whitened_posterior_flow
from pyroflows.transforms import CholeskyAffine, Compiled, Flow, FlowStack
from pyroflows.transforms.registry import check_options


class AutoFlow(AutoContinuous):
    r"""A normalizing-flow guide over all continuous latent sites of a Pyro model.

    Like every :class:`~pyro.infer.autoguide.AutoContinuous` guide, it maps each latent
    site to the real line (:func:`~torch.distributions.constraints` bijections) and
    concatenates them into one vector :math:`z \in \mathbb{R}^D`. Its posterior is

    .. math:: z = \mu + L f(\epsilon), \qquad \epsilon \sim \mathcal{N}(0, I_D),

    where :math:`f` is a stack of the registered flow family ``flow`` built with
    ``**options`` (e.g. ``layers``, ``hidden``) and :math:`\mu + L\,\cdot` an affine
    Gaussian part. Every family starts at the identity, so the guide starts as a Gaussian,
    and with the flow at the identity it is any Gaussian, parametrised as in
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal` (:math:`L = DL_1`, a positive
    diagonal times a unit lower-triangular factor), so it contains that guide.

    Where it starts (``start``):

    * ``"pathfinder"`` (the default): at a normal approximation of the posterior, the
      best-ELBO Gaussian :math:`\mathcal{N}(m, WW^\top)` along the L-BFGS path of the
      model's log-density from the initial point (``init_loc_fn``), or the Laplace
      approximation at its end (:func:`~pyroflows.inference.start.pathfinder`;
      ``guide.start`` reports which). That Gaussian is a fixed whitening
      (``guide.whitening``): :math:`z = m + W(\mu + L f(\epsilon))` with :math:`\mu = 0,
      L = I` at the start (:func:`~pyroflows.inference.vi.whitened_posterior_flow`), so
      every optimiser step is in units of the posterior's scales and the flow only has
      the non-Gaussian part to learn. Flat-prior regressions on raw, correlated columns,
      where a mean-field start is thousands of steps (or Adam's whole run) away, start
      at the right place: on posteriordb's sblrc the realnvp guide's standardised mean
      error after 3000 steps went from 1715 to 0.14. It costs an L-BFGS run, and a few
      thousand model runs to score the candidates, when the guide first runs. Where it
      fails (an improper posterior, a log-density that is not finite along the path) a
      ``RuntimeWarning`` says why and the guide starts as with ``None``.
    * ``None``: at the initial point, :math:`\mu` at ``init_loc_fn``'s value (by default
      the prior median, or a feasible point where the prior cannot be sampled, e.g. an
      improper flat prior) and :math:`L` at ``init_scale`` times the identity: step 0 is
      the mean-field Gaussian of :class:`~pyro.infer.autoguide.AutoDiagonalNormal`.

    ``guide.transform`` is the plain :class:`~pyroflows.FlowStack` of its parts,
    ``guide.flow`` (a :func:`~pyroflows.build` of the family, whose ``state_dict`` loads
    into one), ``guide.gaussian`` (:class:`~pyroflows.transforms.CholeskyAffine`) and, with
    a start, ``guide.whitening``; the latent vector is drawn with its log-density in one
    forward pass (:meth:`~pyroflows.FlowDistribution.rsample_and_log_prob`) and recorded as
    a :class:`~pyro.distributions.Delta` that carries it, as Pyro's autoguides record each
    site.

    Two options make flow guides as reliable as the Gaussian on near-Gaussian posteriors,
    where early steps otherwise bend the flow to chase a far-off mode and leave it in a
    worse optimum than the Gaussian it contains:

    * ``warmup=n`` leaves the flow out (at its identity start) for the first ``n`` guide
      calls that record gradients (SVI steps, with one particle or vectorised particles;
      a mixture under :class:`~pyroflows.StratifiedELBO`: ``components`` calls a step),
      so that :math:`\mu, L` first fit the best Gaussian; the flow then refines it. Its
      parameters get no gradient until then (not a zero one), so an optimiser starts their
      state at the release: Adam's first steps are then as small as at any start, where
      after a thousand zero gradients they would be several times the learning rate.
      (Not under ``JitTrace_ELBO``, which runs the guide's Python once: refused there.)
    * ``stl=True`` scores each draw with the flow's parameters held fixed: the
      path-derivative ("sticking the landing") gradient (Roeder et al. 2017, see
      :class:`~pyroflows.FlowDistribution`), whose variance vanishes as the guide
      approaches the posterior. It costs a gradient-free forward pass per step for planar
      flows and an inverse pass for the others, and suits ``Trace_ELBO`` (not
      importance-weighted bounds such as ``RenyiELBO``).

    ``components=K > 1`` makes the guide a mixture of ``K`` such flows with learned weights
    (:attr:`weights`), :math:`q(z) = \sum_k \pi_k q_k(z)`, for posteriors with several
    modes, which one flow trained by reverse KL covers only one of. Train it with
    :class:`~pyroflows.StratifiedELBO`, which draws from every component each step
    (:meth:`pinned`); another ELBO is refused. With a start, Pathfinder runs from the
    initial point and ``2K - 1`` prior draws, and the components start at the best starts
    at distinct modes (the best again, in turn, where there are fewer); with ``start=None``
    at those points. Each component is a :class:`~pyroflows.FlowStack` in
    ``guide.transforms``; :attr:`transform` and :meth:`get_transform` (NeuTra) are for one
    flow only.

    Sampling and scoring a draw cost one forward pass of the flow, for planar and radial
    flows too (a mixture: one forward pass and an inverse pass per other component).
    Actnorm layers start at the identity like the rest (there is no data to
    start them from).
    Device and dtype follow the model's tensors. Supports whose bounds depend on other
    latent sites (e.g. ``Uniform(0, 1 - a)``) are evaluated at each draw's own values, by
    replaying the model (Pyro's autoguides freeze such bounds at the initial point).
    Latent sites inside a subsampled plate are refused: one flow over all latent sites
    cannot be sized to a minibatch.

    ``compile=True`` runs the flow's passes compiled by :func:`torch.compile`
    (:class:`~pyroflows.transforms.Compiled`: one graph per pass for the coupling,
    autoregressive and spline families); Pyro's tracing around it stays eager, so the gain
    is the flow's share of a step. On a GPU, train with
    :class:`~pyroflows.StratifiedELBO`: its loss reads no value on the host, where Pyro's
    ``Trace_ELBO`` reads each site's log-density and ``SVI.step`` returns the loss as a
    float (one wait for the device each).

    Train it with :func:`~pyroflows.decaying_adam` (clipped Adam at a rate falling tenfold
    over the loop): at a constant rate one-particle gradient noise stays in the answer.
    :func:`~pyroflows.temper` anneals the likelihood; a trained guide is a NeuTra warp for
    NUTS (``pyro.infer.reparam.NeuTraReparam``) whatever its family.

    References:
        Variational Inference with Normalizing Flows (Rezende & Mohamed, 2015)
        https://arxiv.org/abs/1505.05770

        Automatic Differentiation Variational Inference (Kucukelbir et al., 2017)
        https://arxiv.org/abs/1603.00788

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer import SVI, Trace_ELBO
        >>> import pyroflows
        >>> def model(y):
        ...     scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(0.0, scale), obs=y)
        >>> guide = AutoFlow(model, flow="planar", layers=4)
        >>> svi = SVI(model, guide, pyroflows.decaying_adam(100), Trace_ELBO())
        >>> loss = svi.step(torch.randn(20))
        >>> sorted(guide(torch.randn(20)))
        ['scale']
    """

    def __init__(
        self,
        model: Callable[..., Any],
        flow: str = "realnvp",
        *,
        init_loc_fn: Callable[[dict], Tensor] | None = None,
        init_scale: float = 0.1,
        start: str | None = "pathfinder",
        warmup: int = 0,
        stl: bool = False,
        components: int = 1,
        compile: bool = False,
        **options: Any,
    ) -> None:
        check_options(flow, options)  # an unknown family or option fails here, not at fit
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        #: the number of flows in the mixture (1: one flow)
        self.components = check_positive_int("components", components)
        if stl and components > 1:
            raise ValueError("stl=True is for one flow (components=1)")
        self._pin: int | None = None  # the component draws come from (StratifiedELBO)
        self._start = start
        #: the :class:`~pyroflows.inference.start.GaussianStart` the guide started from
        #: (``start="pathfinder"``), set when the guide first runs
        self.start: GaussianStart | None = None
        self._flow_name = flow
        self._flow_options = options
        self._init_scale = check_positive_float("init_scale", init_scale)
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
        self._warmup = warmup
        #: whether draws are scored with the path-derivative (STL) gradient
        self.stl = bool(stl)
        self._calls = 0  # guide calls that recorded gradients, for the warm-up
        self._compile = bool(compile)
        super().__init__(model, init_loc_fn=init_loc_fn or init_to_median_or_feasible)
        self._unwrapped_model = (model,)  # a tuple, so that a PyroModule model is no submodule

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._setup_prototype(*args, **kwargs)
        except torch.linalg.LinAlgError as error:
            sites = _SiteRecorder()  # run it again, to see the sites it reaches
            with contextlib.suppress(torch.linalg.LinAlgError), poutine.block(), sites:
                self.model(*args, **kwargs)  # at the initial values, as before
            raise _model_failed(error, sites, "at its initial point") from error
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            for frame in site["cond_indep_stack"]:
                if frame.full_size is not None and frame.full_size != frame.size:
                    raise ValueError(
                        f"AutoFlow cannot guide latent site {name!r}: it lies in plate "
                        f"{frame.name!r}, subsampled to {frame.size} of {frame.full_size}. "
                        "A flow over all latent sites would be sized to one minibatch. "
                        "Subsample only plates of observed sites, or guide local latent "
                        "sites with an amortised guide."
                    )
        init = self._init_loc()
        self._dependent = _sites_with_dependent_support(self.model, self.prototype_trace)
        points = [init, *self._prior_points(init, args, kwargs)]
        starts: list[GaussianStart] = []
        if self._start == "pathfinder":
            log_joint = functools.partial(self._log_joint, args, kwargs)
            try:
                starts = distinct_starts(log_joint, points, self.components)
            except ValueError as error:  # e.g. an improper posterior: no Gaussian to start at
                warnings.warn(
                    f"AutoFlow's pathfinder start failed ({error}); starting at the model's "
                    f"initial point with init_scale={self._init_scale} instead (pass "
                    "start=None to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.start = starts[0] if starts else None
        stacks = []
        for k in range(self.components):
            if starts:  # fewer distinct modes than components: the best ones again, in turn
                parts = whitened_posterior_flow(
                    self._flow_name, starts[k % len(starts)], **self._flow_options
                )
            else:
                parts = posterior_flow(
                    self._flow_name, points[k], self._init_scale, **self._flow_options
                )
            stacks.append(FlowStack(parts))
        self.transforms = nn.ModuleList(stacks)
        if self.components > 1:
            self.logits = nn.Parameter(init.new_zeros(self.components))
        self.register_buffer("_base_loc", torch.zeros_like(init))  # follows .to(device)

    def _prior_points(self, init: Tensor, args: tuple, kwargs: dict) -> list[Tensor]:
        """``2 * components - 1`` more points to start components (or their paths) from:
        draws of the prior, as unconstrained vectors (standard normal draws about ``init``
        where the prior cannot be sampled); none for one component."""
        if self.components == 1:
            return []
        points = []
        for _ in range(2 * self.components - 1):
            try:
                with poutine.block():
                    trace = poutine.trace(self._unwrapped_model[0]).get_trace(*args, **kwargs)
                sites = [trace.nodes[name] for name in self._unconstrained_shapes]
                parts = [
                    biject_to(site["fn"].support).inv(site["value"].detach()).reshape(-1)
                    for site in sites
                ]
                points.append(torch.cat(parts).to(init))
            except NotImplementedError:  # an improper prior has no draws
                points.append(init + torch.randn_like(init))
        return points

    def _log_joint(self, args: tuple, kwargs: dict, latent: Tensor) -> Tensor:
        r"""The model's log-density of each unconstrained latent vector (rows of ``latent``):
        :math:`\log p(x, y) + \log|\det \partial x / \partial z|`, one model run per row."""
        model = self._unwrapped_model[0]
        values = []
        for row in latent:
            constrained, log_det = {}, 0.0
            for name, value, log_density in self._constrain(row, *args, **kwargs):
                constrained[name] = value
                log_det = log_det + log_density.sum()
            sites = _SiteRecorder()
            try:
                with poutine.block(), sites:
                    trace = poutine.trace(poutine.condition(model, data=constrained)).get_trace(
                        *args, **kwargs
                    )
            except torch.linalg.LinAlgError as error:  # pathfinder reads it as density 0
                raise _model_failed(error, sites, "while the start (pathfinder) ran it") from error
            values.append(trace.log_prob_sum() - log_det)
        return torch.stack(values)

    def _init_loc(self) -> Tensor:
        """The model's initial point as one unconstrained vector, on the model's device.

        Device and dtype are those of the model's observations (else of its latent values),
        so that initial values made on the CPU (e.g. for flat priors) join the model there.
        """
        latents = [site["value"] for _, site in self.prototype_trace.iter_stochastic_nodes()]
        observed = [
            site["value"]
            for site in self.prototype_trace.nodes.values()
            if site["type"] == "sample" and site["is_observed"]
        ]
        device = (observed or latents)[0].device
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in latents], torch.float32)
        parts = [
            biject_to(site["fn"].support).inv(site["value"].detach()).reshape(-1)
            for _, site in self.prototype_trace.iter_stochastic_nodes()
        ]
        return torch.cat([part.to(device=device, dtype=dtype) for part in parts])

    def get_base_dist(self) -> dist.Distribution:
        return dist.Normal(self._base_loc, torch.ones_like(self._base_loc)).to_event(1)

    @property
    def transform(self) -> FlowStack:
        """The flow of the posterior (one component): :attr:`flow`, :attr:`gaussian` and,
        with a start, :attr:`whitening`, in the order a draw passes them."""
        if self.components > 1:
            raise ValueError(
                f"a mixture guide (components={self.components}) has one transform per "
                "component: see guide.transforms"
            )
        return self.transforms[0]

    @property
    def flow(self) -> Flow:
        """The family's flow: a plain :func:`~pyroflows.build`, whose ``state_dict`` loads
        into one."""
        return self.transform[0]

    @property
    def gaussian(self) -> CholeskyAffine:
        r"""The Gaussian part, :math:`z \mapsto \mu + L z`."""
        return self.transform[1]

    @property
    def whitening(self) -> CholeskyAffine | None:
        """The fixed whitening by the start's Gaussian (``start="pathfinder"``), else
        ``None``."""
        return self.transform[2] if len(self.transform) > 2 else None

    @property
    def weights(self) -> Tensor:
        r"""The mixture weights :math:`\pi` (``components > 1``), a tensor of one 1 for one
        flow."""
        if self.components == 1:
            return torch.ones_like(self._base_loc[:1])
        return self.logits.softmax(-1)

    @contextlib.contextmanager
    def pinned(self, k: int) -> Iterator[None]:
        """Within it, the guide draws from component ``k`` only, scored by the mixture's
        density (how :class:`~pyroflows.StratifiedELBO` reaches every component)."""
        if not 0 <= k < self.components:
            raise ValueError(f"component must be in 0..{self.components - 1}, got {k!r}")
        self._pin = k
        try:
            yield
        finally:
            self._pin = None

    def _component_transform(self, k: int) -> Flow:
        """Component ``k``'s flow: the family, then the Gaussian part and the whitening
        (those alone during the warm-up)."""
        stack = self.transforms[k]
        if self._calls <= self._warmup and self._warmup > 0:
            return FlowStack(list(stack)[1:]) if len(stack) > 2 else stack[1]
        return Compiled(stack) if self._compile else stack

    def get_transform(self, *args: Any, **kwargs: Any) -> Flow:
        """The flow of the posterior: the family, then the Gaussian part and the whitening
        (those alone during the warm-up). One flow only: a mixture has no single map (and
        so no NeuTra warp)."""
        if self.components > 1:
            raise ValueError(
                f"a mixture guide (components={self.components}) is no single transform; "
                "NeuTraReparam needs components=1"
            )
        return self._component_transform(0)

    def get_posterior(self, *args: Any, **kwargs: Any) -> FlowDistribution | FlowMixture:
        """The guide's distribution over the unconstrained latent vector: a flow, or a
        :class:`~pyroflows.inference.bounds.FlowMixture` of ``components`` flows."""
        flows = [
            FlowDistribution(self.get_base_dist(), self._component_transform(k), stl=self.stl)
            for k in range(self.components)
        ]
        return flows[0] if self.components == 1 else FlowMixture(flows, self.logits)

    def sample_latent(self, *args: Any, **kwargs: Any) -> Tensor:
        """Draw the unconstrained latent vector and its log-density in one forward pass.

        The draw is shaped by the enclosing plates (e.g. vectorised particles) and recorded
        at the auxiliary latent site as a :class:`~pyro.distributions.Delta` carrying its
        log-density. A mixture draws from the pinned component (:meth:`pinned`), else from
        a component drawn by its weight (without gradient).
        """
        posterior = self.get_posterior(*args, **kwargs)
        plates = get_plates()
        batch = [1] * max((-frame.dim for frame in plates), default=0)
        for frame in plates:
            batch[frame.dim] = frame.size
        shape = torch.Size(batch)
        if isinstance(posterior, FlowDistribution):
            latent, log_q = posterior.rsample_and_log_prob(shape)
        elif self._pin is not None:
            latent, log_q = posterior.rsample_component(self._pin, shape)
        else:
            latent = posterior.sample(shape)
            log_q = posterior.log_prob(latent)
        site = dist.Delta(latent, log_density=log_q, event_dim=1)
        return pyro.sample(f"_{self._pyro_name}_latent", site, infer={"is_auxiliary": True})

    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self._calls}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._calls = int(state["calls"])

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        if self._warmup and torch.jit.is_tracing():
            raise ValueError(
                "AutoFlow(warmup=...) counts SVI steps in Python, which a JIT ELBO runs only "
                "once, while tracing; use warmup=0 with JitTrace_ELBO"
            )
        if torch.is_grad_enabled():
            if self._pin is None and self.components > 1:
                raise ValueError(
                    f"AutoFlow(components={self.components}) is trained by "
                    "pyroflows.StratifiedELBO, which draws from every component: another "
                    "ELBO's gradient would miss the weights' part. To draw from it, call it "
                    "under torch.no_grad() (as Predictive does)."
                )
            self._calls += 1
        latent = self.sample_latent(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, value, log_density in self._constrain(latent, *args, **kwargs):
            site = self.prototype_trace.nodes[name]
            if poutine.get_mask() is False:
                log_density = 0.0
            delta = SiteDelta(value, log_density=log_density, event_dim=site["fn"].event_dim)
            with ExitStack() as stack:
                for frame in self._cond_indep_stacks[name]:
                    stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, delta)
        return result

    def _constrain(
        self, latent: Tensor, *args: Any, **kwargs: Any
    ) -> Iterator[tuple[str, Tensor, Tensor]]:
        """Yield ``(site, constrained value, log|det|)`` of each site of an unconstrained draw.

        Supports come from the prototype trace, except where they depend on other latent
        sites: then the model is replayed with this draw's values to read them.
        """
        unconstrained = {site["name"]: value for site, value in self._unpack_latent(latent)}
        if self._dependent:
            replay = _ConstrainMessenger(unconstrained)
            with poutine.block(), replay:
                self._unwrapped_model[0](*args, **kwargs)
            supports = replay.supports
        else:
            supports = {}
        for name, u in unconstrained.items():
            fn = self.prototype_trace.nodes[name]["fn"]
            transform = biject_to(supports.get(name, fn.support))
            value = transform(u)
            log_density = transform.inv.log_abs_det_jacobian(value, u)
            log_density = sum_rightmost(
                log_density, log_density.dim() - value.dim() + fn.event_dim
            )
            yield name, value, log_density

    @torch.no_grad()
    def quantiles(
        self, quantiles: list[float] | Tensor, *args: Any, num_samples: int = 2000, **kwargs: Any
    ) -> dict[str, Tensor]:
        r"""Posterior quantiles of each latent site, estimated from ``num_samples`` draws.

        Flows have no closed-form quantiles. The quantiles of each coordinate of the
        unconstrained latent vector are estimated from draws of the guide and mapped to
        each site's support. For sites with elementwise monotone constraints (real,
        positive, intervals) these are the marginal quantiles of the site; for sites with
        vector constraints (simplex, ordered, Cholesky factors) they are the image of the
        unconstrained quantiles, which lies in the support, as in Pyro's own autoguides.
        Returns ``{site: tensor of shape (len(quantiles), *site_shape)}``.

        Example:
            >>> import torch, pyro, pyro.distributions as dist
            >>> def model():
            ...     pyro.sample("x", dist.Normal(0.0, 1.0))
            >>> guide = AutoFlow(model, init_scale=1.0)
            >>> q = guide.quantiles([0.1, 0.5, 0.9])["x"]
            >>> q.shape, bool(q[0] < q[1] < q[2])
            (torch.Size([3]), True)
        """
        check_positive_int("num_samples", num_samples)
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        draws = self.get_posterior(*args, **kwargs).sample((num_samples,))
        levels = torch.as_tensor(quantiles, dtype=draws.dtype, device=draws.device)
        if levels.dim() != 1 or not bool(((levels >= 0) & (levels <= 1)).all()):
            raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles!r}")
        result: dict[str, list[Tensor]] = {}
        for latent in torch.quantile(draws, levels, dim=0):
            for name, value, _ in self._constrain(latent, *args, **kwargs):
                result.setdefault(name, []).append(value)
        return {name: torch.stack(values) for name, values in result.items()}

    @torch.no_grad()
    def median(self, *args: Any, num_samples: int = 2000, **kwargs: Any) -> dict[str, Tensor]:
        """Posterior median of each latent site, estimated from ``num_samples`` draws.

        See :meth:`quantiles` for how the estimate is formed.

        Example:
            >>> import pyro, pyro.distributions as dist
            >>> def model():
            ...     pyro.sample("rate", dist.Gamma(2.0, 1.0))
            >>> guide = AutoFlow(model)
            >>> bool(guide.median()["rate"] > 0)
            True
        """
        quantiles = self.quantiles([0.5], *args, num_samples=num_samples, **kwargs)
        return {name: value[0] for name, value in quantiles.items()}


class SiteDelta(dist.Delta):
    r"""The guide's value of one latent site, with the log-Jacobian of its constraint as its
    log-density, like the site of every Pyro autoguide.

    Its own KL rule, :math:`\mathrm{KL}(\delta_v \,\|\, p) = \log|\det J| - \log p(v)`,
    counts that log-density: the rule Pyro registers for a ``Delta`` drops it, so under
    ``TraceMeanField_ELBO`` a constrained site (e.g. a positive scale) would be fitted
    without the Jacobian of its constraint, as Pyro's own autoguides are.
    """


@register_kl(SiteDelta, dist.Distribution)
def _kl_site_delta(p: SiteDelta, q: dist.Distribution) -> Tensor:
    return p.log_density - q.log_prob(p.v)


def init_to_median_or_feasible(site: dict) -> Tensor:
    """Pyro's ``init_to_median``, falling back to ``init_to_feasible`` for priors that cannot
    be sampled (``ImproperUniform`` raises ``NotImplementedError``, which Pyro's fallback
    does not catch).

    Example:
        >>> import pyro.distributions as dist
        >>> from pyro.distributions import constraints
        >>> site = {"fn": dist.ImproperUniform(constraints.positive, (), ()), "name": "s"}
        >>> float(init_to_median_or_feasible(site))
        1.0
    """
    try:
        return init_to_median(site)
    except NotImplementedError:
        fn = site["fn"]
        to_support = transform_to(fn.support)
        value = to_support(torch.zeros(to_support.inverse_shape(fn.shape())))
        value._pyro_custom_init = False
        return value


class _SiteRecorder(Messenger):
    """Records the name and dtype of each sample site a model run reaches, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.dtype: torch.dtype | None = None

    def _pyro_sample(self, msg: dict) -> None:
        self.names.append(msg["name"])
        value = msg["value"]
        if isinstance(value, Tensor) and value.is_floating_point():
            self.dtype = value.dtype


def _model_failed(
    error: torch.linalg.LinAlgError, sites: _SiteRecorder, where: str
) -> torch.linalg.LinAlgError:
    """The model's linear-algebra failure, named: after which site, in which dtype, and what
    to do about it (a factorisation that fails in float32 often succeeds in float64)."""
    after = f"after site {sites.names[-1]!r}" if sites.names else "before its first site"
    dtype = str(sites.dtype or torch.get_default_dtype()).removeprefix("torch.")
    advice = (
        "float32 rounds a nearly singular covariance to an indefinite one: give the model "
        "float64 data (or a larger jitter)"
        if dtype == "float32"
        else "check the matrix the model factorises there (add jitter?)"
    )
    return torch.linalg.LinAlgError(
        f"the model's linear algebra failed {where}, {after} (values in {dtype}): "
        f"{str(error).splitlines()[0]} {advice}"
    )


class _ConstrainMessenger(Messenger):
    """Replays a model with given unconstrained latent values, recording each site's support."""

    def __init__(self, unconstrained: dict[str, Tensor]) -> None:
        super().__init__()
        self.unconstrained = unconstrained
        self.supports: dict[str, constraints.Constraint] = {}

    def _pyro_sample(self, msg: dict) -> None:
        name = msg["name"]
        if msg["is_observed"] or name not in self.unconstrained:
            return
        support = msg["fn"].support
        self.supports[name] = support
        msg["value"] = biject_to(support)(self.unconstrained[name])
        msg["done"] = True


def _sites_with_dependent_support(model: Callable[..., Any], trace: poutine.Trace) -> set[str]:
    """Latent sites whose support changes with the values of other latent sites.

    The model is traced once with every latent value a fresh leaf that requires grad;
    a support whose bounds then carry a gradient depends on some latent value.
    """
    leaves = {
        name: site["value"].detach().requires_grad_(site["value"].is_floating_point())
        for name, site in trace.iter_stochastic_nodes()
    }
    with poutine.block(), torch.enable_grad():
        probe = poutine.trace(poutine.condition(model, data=leaves)).get_trace(
            *trace.nodes["_INPUT"]["args"], **trace.nodes["_INPUT"]["kwargs"]
        )
    return {
        name
        for name in leaves
        if name in probe.nodes and _has_grad(probe.nodes[name]["fn"].support)
    }


def _has_grad(constraint: constraints.Constraint) -> bool:
    for value in vars(constraint).values():
        if isinstance(value, Tensor) and value.requires_grad:
            return True
        if isinstance(value, constraints.Constraint) and _has_grad(value):
            return True
    return False
