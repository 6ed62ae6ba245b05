# %% [markdown]
# # NUTS in a flow's space: NeuTra with a pyroflows guide
#
# Neal's funnel defeats plain NUTS: in the neck the posterior is thousands of times
# narrower than in the mouth, and no single step size serves both. NeuTra (Hoffman et al.
# 2019, "NeuTra-lizing bad geometry in Hamiltonian Monte Carlo using neural transport")
# first fits a flow guide by variational inference, then runs NUTS on the model pulled back
# through the guide's transform, where the posterior is close to a standard normal; the
# draws are mapped back through the same transform, and they are exact MCMC draws of the
# model's posterior whatever the guide's error (the guide only changes the geometry).
#
# Pyro's `NeuTraReparam` takes any pyroflows `AutoFlow` whose family has a forward map
# (all of them do). Run `python tutorials/05_neutra.py`; figures go to `tutorials/output/`,
# or to the folder that `PYROFLOWS_OUTPUT` names. `PYROFLOWS_QUICK=1` runs with few steps.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from pyro.infer.reparam import NeuTraReparam
from pyro.ops.stats import effective_sample_size

import pyroflows

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("PYROFLOWS_OUTPUT", HERE / "output"))
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("PYROFLOWS_QUICK") == "1"
SVI_STEPS, WARMUP, DRAWS = (200, 100, 100) if QUICK else (4000, 500, 1000)
DIM = 10  # the funnel's width: v and nine x's
torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)  # NUTS on a small model is many tiny operations
torch.manual_seed(0)
pyro.set_rng_seed(0)

# %% [markdown]
# ## The funnel
#
# `v ~ Normal(0, 3)` and, given `v`, nine `x_i ~ Normal(0, exp(v / 2))`. The marginal of
# `v` is known exactly, `Normal(0, 3)`, so we can check every sampler against it.


# %%
def funnel() -> None:
    v = pyro.sample("v", dist.Normal(0.0, 3.0))
    with pyro.plate("x_plate", DIM - 1):
        pyro.sample("x", dist.Normal(0.0, (v / 2).exp()))


def run_nuts(model) -> tuple[dict[str, torch.Tensor], float]:
    """One NUTS chain; its draws and its wall time (warm-up included)."""
    kernel = NUTS(model, jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, warmup_steps=WARMUP, num_samples=DRAWS, disable_progbar=True)
    started = time.perf_counter()
    mcmc.run()
    return mcmc.get_samples(), time.perf_counter() - started


def ess(values: torch.Tensor) -> float:
    return float(effective_sample_size(values.reshape(1, len(values), -1)).min())


# %% [markdown]
# ## Plain NUTS

# %%
plain, plain_seconds = run_nuts(funnel)

# %% [markdown]
# ## NUTS with a pyroflows NeuTra reparametrisation
#
# A RealNVP guide learns the funnel's shape by a plain SVI loop: an affine coupling layer
# can represent `x = exp(v / 2) * eps` exactly. Three choices matter here. `start=None`:
# the funnel's density peaks deep in the neck (at `v = -40.5`), so a quasi-Newton start
# whitens on a scale far too small for the mouth; the guide starts at the prior's median
# instead. `stl=True` and 16 particles: quieter gradients. `pyroflows.decaying_adam`: a
# rate falling tenfold, with clipped gradients (the neck's draws give large ones). The
# guide is then frozen and handed to `NeuTraReparam`; NUTS runs on its one shared latent
# site, and `transform_sample` maps the draws back to `v` and `x`. NeuTra's wall time
# includes the guide's training.

# %%
started = time.perf_counter()
guide = pyroflows.AutoFlow(funnel, "realnvp", layers=4, hidden=(32, 32), start=None, stl=True)
optimizer = pyroflows.decaying_adam(SVI_STEPS, lr=1e-2)  # falls tenfold, clipped at 10
svi = SVI(funnel, guide, optimizer, Trace_ELBO(16, vectorize_particles=True))
for _ in range(SVI_STEPS):
    svi.step()
guide.requires_grad_(False)
training_seconds = time.perf_counter() - started
neutra = NeuTraReparam(guide)
latent, nuts_seconds = run_nuts(neutra.reparam(funnel))
# transform_sample maps one draw at a time where a site sits in a plate
mapped = [neutra.transform_sample(z) for z in latent["v_shared_latent"]]
warped = {site: torch.stack([m[site] for m in mapped]) for site in ("v", "x")}
neutra_seconds = training_seconds + nuts_seconds

# %% [markdown]
# ## Effective samples per second
#
# The smallest effective sample size over the ten coordinates, divided by the wall time.
# The standard deviation of `v` should be 3; plain NUTS rarely enters the neck (`v` far
# below 0), which shows as a too-small spread and a low effective sample size.

# %%
rows = []
for label, draws, seconds in [
    ("plain NUTS", plain, plain_seconds),
    ("NeuTra NUTS (training included)", warped, neutra_seconds),
]:
    values = torch.cat([draws["v"].reshape(-1, 1), draws["x"].reshape(-1, DIM - 1)], dim=-1)
    n_eff = ess(values)
    rows.append((label, seconds, n_eff, n_eff / seconds, float(draws["v"].std())))
print(f"{'sampler':34s} {'seconds':>8s} {'min ESS':>8s} {'ESS/s':>7s} {'sd(v)':>6s}")
for label, seconds, n_eff, rate, sd in rows:
    print(f"{label:34s} {seconds:8.1f} {n_eff:8.1f} {rate:7.2f} {sd:6.2f}")
print(f"of which training the guide: {training_seconds:.1f} s")
print(f"NeuTra / plain ESS per second: {rows[1][3] / rows[0][3]:.1f}x (sd(v) exact: 3)")

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharex=True, sharey=True)
for ax, (label, draws) in zip(axes, [("plain NUTS", plain), ("NeuTra NUTS", warped)]):
    ax.scatter(draws["x"][:, 0], draws["v"], s=3, alpha=0.5)
    ax.set_title(label)
    ax.set_xlabel("x[0]")
axes[0].set_ylabel("v")
axes[0].set_xlim(-30, 30)
axes[0].set_ylim(-10, 10)
fig.tight_layout()
fig.savefig(OUT / "05_funnel.png", dpi=80)
