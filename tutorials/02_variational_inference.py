# %% [markdown]
# # Variational inference with flows
#
# Two jobs: fitting a flow to an unnormalised density (`pyroflows.fit_reverse_kl`), and a
# flow guide for a Pyro model (`pyroflows.AutoFlow`), checked with importance-weight
# diagnostics. Run `python tutorials/02_variational_inference.py`; figures go to
# `tutorials/output/`, or to the folder that `PYROFLOWS_OUTPUT` names. `PYROFLOWS_QUICK=1`
# runs everything with few steps (the test suite does that).

# %%
import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.optim import Adam

import pyroflows
from pyroflows.inference.targets import (
    ENERGIES,
    energy_log_density,
    grid_log_normalizer,
    reverse_kl,
)

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("PYROFLOWS_OUTPUT", HERE / "output"))
OUT.mkdir(parents=True, exist_ok=True)
QUICK = os.environ.get("PYROFLOWS_QUICK") == "1"
STEPS = 100 if QUICK else 3000
torch.manual_seed(0)
pyro.set_rng_seed(0)

# %% [markdown]
# ## Part 1: planar flows on the four test energies of Rezende & Mohamed (2015)
#
# Table 1 of the paper defines four energies `U(z)` on the plane with `p(z) ∝ exp(-U(z))`;
# Figure 3 fits planar flows of length K = 2, 8, 32 to them. We do the same with reverse KL
# and, because `log Z` is computable by quadrature on a grid, we can report the exact
# `KL(q || p)` (up to Monte Carlo error in the expectation over `q`).

# %%
grid_axis = torch.linspace(-4, 4, 200)
grid = torch.stack(torch.meshgrid(grid_axis, grid_axis, indexing="xy"), dim=-1)
lengths = [2, 8, 32]
fig, axes = plt.subplots(4, 4, figsize=(12, 12))
table = {}
for row, name in enumerate(ENERGIES):
    log_p = energy_log_density(name)
    log_z = grid_log_normalizer(log_p)
    axes[row, 0].contourf(grid[..., 0], grid[..., 1], (log_p(grid) - log_z).exp(), levels=30)
    axes[row, 0].set_ylabel(name)
    for col, k in enumerate(lengths, start=1):
        q = pyroflows.fit_reverse_kl(
            log_p,
            2,
            "planar",
            layers=k,
            steps=STEPS,
            num_particles=256,
            lr=1e-2,
            progress=False,
        )
        table[(name, k)] = reverse_kl(q, log_p, log_z, 20_000 if QUICK else 200_000)
        with torch.no_grad():
            density = q.log_prob(grid).exp()
        axes[row, col].contourf(grid[..., 0], grid[..., 1], density, levels=30)
        axes[0, col].set_title(f"planar K = {k}")
axes[0, 0].set_title("true density")
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(OUT / "02_energies.png", dpi=70)

kl = pd.Series(table).unstack()
kl.columns = [f"K={k}" for k in kl.columns]
print("KL(q || p) in nats:")
print(kl.round(3).to_string())

# %% [markdown]
# ## Part 2: a flow guide on a real model, against reference draws
#
# The non-centred eight schools model (from posteriordb, whose reference posterior was
# drawn with long, checked Stan runs):
# `theta_trans_j ~ N(0, 1)`, `mu ~ N(0, 5)`, `tau ~ HalfCauchy(5)`,
# `theta_j = mu + tau theta_trans_j`, `y_j ~ N(theta_j, sigma_j)`.

# %%
data = json.loads((HERE / "data" / "eight_schools.json").read_text())
y = torch.tensor(data["y"], dtype=torch.float64)
sigma = torch.tensor(data["sigma"], dtype=torch.float64)
reference = pd.read_csv(HERE / "data" / "eight_schools_reference.csv")


def eight_schools():
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=torch.float64)))
    with pyro.plate("schools", 8):
        theta_trans = pyro.sample(
            "theta_trans", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0)
        )
        theta = pyro.deterministic("theta", mu + tau * theta_trans)
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def fit(guide, steps):
    pyro.clear_param_store()
    svi = SVI(
        eight_schools,
        guide,
        Adam({"lr": 5e-3}),
        Trace_ELBO(num_particles=16, vectorize_particles=True),
    )
    for _ in range(steps):
        svi.step()
    return guide


def draws(guide, n=4000):
    data = pyroflows.inference.diagnostics.to_inference_data(guide, eight_schools, num_samples=n)
    columns = {f"theta[{j + 1}]": data.posterior["theta"].values[0, :, j] for j in range(8)}
    columns["mu"] = data.posterior["mu"].values[0]
    columns["tau"] = data.posterior["tau"].values[0]
    return pd.DataFrame(columns), data


results = {}
for label, guide in [
    ("AutoNormal", AutoNormal(eight_schools)),
    ("AutoFlow realnvp", pyroflows.AutoFlow(eight_schools, "realnvp", layers=6)),
]:
    fit(guide, 200 if QUICK else 5000)
    samples, inference_data = draws(guide, 500 if QUICK else 4000)
    diagnosis = pyroflows.inference.diagnostics.diagnose(
        guide, eight_schools, num_samples=300 if QUICK else 2000
    )
    error_mean = ((samples.mean() - reference.mean()) / reference.std()).abs()
    error_sd = ((samples.std() - reference.std()) / reference.std()).abs()
    results[label] = {
        "max |mean error| / sd": error_mean.max(),
        "max |sd error| / sd": error_sd.max(),
        "tau sd / reference": samples["tau"].std() / reference["tau"].std(),
        "PSIS k-hat": diagnosis.k_hat,
        "verdict": diagnosis.verdict,
    }
    results[label]["samples"] = samples

print(
    pd.DataFrame(
        {k: {m: v for m, v in r.items() if m != "samples"} for k, r in results.items()}
    ).T.to_string()
)

fig, ax = plt.subplots(figsize=(6, 4))
bins = np.linspace(0, 25, 60)
ax.hist(reference["tau"], bins=bins, density=True, alpha=0.4, label="reference (Stan)")
for label, r in results.items():
    ax.hist(r["samples"]["tau"], bins=bins, density=True, histtype="step", lw=2, label=label)
ax.set_xlabel("tau")
ax.legend()
fig.savefig(OUT / "02_eight_schools_tau.png", dpi=80)
