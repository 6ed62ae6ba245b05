# %% [markdown]
# # Continuous flows: flow matching, exact densities, and a CNF guide
#
# A continuous normalizing flow (the `cnf` family) moves each point along an ODE,
# `dz/dt = v(z, t)`, from the base at `t = 0` to the data at `t = 1`; its log-density
# follows from the integrated divergence of `v` (FFJORD). Maximum likelihood trains `v`
# through the ODE solver; flow matching (Lipman et al. 2022) trains it by regression on the
# straight path `x_t = (1 - t) x0 + t x1` from a base draw `x0` to a data row `x1`, one
# evaluation of `v` per step and no solver at all. Either way the fitted flow scores rows
# exactly, so it can be compared with any other family on the same rows.
#
# Run `python tutorials/06_flow_matching.py`; figures go to `tutorials/output/`, or to the
# folder that `PYROFLOWS_OUTPUT` names. `PYROFLOWS_QUICK=1` runs with few epochs.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from sklearn.datasets import load_wine, make_moons
from torchdiffeq import odeint

import pyroflows
from pyroflows.transforms.cnf import count_evaluations

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("PYROFLOWS_OUTPUT", HERE / "output"))
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("PYROFLOWS_QUICK") == "1"
EPOCHS, SVI_STEPS = (15, 30) if QUICK else (1000, 1500)
torch.manual_seed(0)
pyro.set_rng_seed(0)

# %% [markdown]
# ## Flow matching on two moons
#
# `DensityEstimator("cnf", objective="flow_matching")` standardises the columns, starts the
# flow at the Gaussian of the rows, and trains the field by flow matching with early
# stopping on the validation rows' flow-matching loss. `select=False` keeps the flow (the
# estimator would otherwise fall back to a mixture where that scores better).

# %%
moons, _ = make_moons(3000, noise=0.05, random_state=0)
moons = pd.DataFrame(moons, columns=["x", "y"])
train, test = moons.iloc[:2400], moons.iloc[2400:]
start = time.perf_counter()
matched = pyroflows.DensityEstimator(
    "cnf", objective="flow_matching", select=False, epochs=EPOCHS, progress=False, seed=0
)
matched.fit(train)
print(f"flow matching: {time.perf_counter() - start:.1f} s, {len(matched.history)} epochs")
with count_evaluations(matched.model) as evaluations:
    score = matched.score(test)
print(f"held-out log-likelihood {score:.3f} nats per row ({evaluations[0]} field evaluations)")

# %% [markdown]
# ## The probability path and the learned field
#
# The flow lives in the standardised space of the rows. Its field can be integrated from
# the base to any time `t`: the draws at `t` are the probability path the flow follows,
# and the arrows are `v(z, t)` at that time.

# %%
model = matched.model  # the table's density: preprocessing, then the flow density
cnf = model.density.flow[0]
base = model.density.base.sample(2000)
times = torch.linspace(0, 1, 5)
with torch.no_grad():
    path = odeint(lambda t, z: cnf.velocity(z, t), base, times, rtol=1e-5, atol=1e-5)
grid = torch.stack(
    torch.meshgrid(torch.linspace(-3, 3, 15), torch.linspace(-3, 3, 15), indexing="xy"), -1
).reshape(-1, 2)
figure, axes = plt.subplots(
    1, len(times), figsize=(3.2 * len(times), 3.2), sharex=True, sharey=True
)
for ax, t, draws in zip(axes, times, path):
    with torch.no_grad():
        arrows = cnf.velocity(grid, t)
    ax.scatter(*draws.T, s=1, alpha=0.3)
    ax.quiver(*grid.T, *arrows.T, color="tab:red", alpha=0.6)
    ax.set_title(f"t = {float(t):.2f}")
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
figure.suptitle("flow matching: draws along the path and the field v(z, t), standardised space")
figure.tight_layout()
figure.savefig(OUT / "06_path.png", dpi=80)

# %% [markdown]
# ## A table: flow matching beside maximum likelihood
#
# On scikit-learn's wine table (178 rows, 13 columns) the same estimator fits the `cnf`
# by flow matching; a `realnvp` by maximum likelihood is its neighbour. Both are scored
# exactly on the same held-out rows, in the data's own units.

# %%
wine = load_wine(as_frame=True).frame.drop(columns="target")
wine_train, wine_test = wine.iloc[::2], wine.iloc[1::2]
for family, objective in [("cnf", "flow_matching"), ("realnvp", "likelihood")]:
    start = time.perf_counter()
    estimator = pyroflows.DensityEstimator(
        family, objective=objective, select=False, epochs=EPOCHS, progress=False, seed=0
    )
    estimator.fit(wine_train)
    seconds = time.perf_counter() - start
    print(
        f"wine, {family} by {objective}: {estimator.score(wine_test):.2f} nats per row "
        f"held out, fitted in {seconds:.1f} s"
    )

# %% [markdown]
# ## A CNF guide for a Pyro model
#
# `cnf` is a guide family like every other: `AutoFlow(model, "cnf")` draws the latent
# vector by solving the ODE forward and scores it with the integrated trace. Here the
# posterior of a banana-shaped model (no data: the posterior is the prior, whose
# normaliser is 1, so the ELBO's gap to 0 is the guide's KL), trained by SVI.


# %%
def banana():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.sample("b", dist.Normal(a**2, 0.5))


guide = pyroflows.AutoFlow(banana, "cnf", hidden=(32, 32), start=None, init_scale=1.0)
svi = SVI(
    banana,
    guide,
    pyroflows.decaying_adam(SVI_STEPS, lr=1e-2),
    Trace_ELBO(num_particles=16, vectorize_particles=True),
)
for _ in range(SVI_STEPS):
    loss = svi.step()
report = pyroflows.diagnostics.diagnose(guide, banana, num_samples=100 if QUICK else 1000)
print(
    f"CNF guide: ELBO {report.elbo:.3f} (log Z = 0), k-hat {report.k_hat:.2f} "
    f"({report.verdict}), importance-weighted ELBO {report.iw_elbo:.3f}"
)
