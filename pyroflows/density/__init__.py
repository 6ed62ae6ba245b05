"""Forward KL: exact densities of tables (estimator, preprocessing, training loop).

``baselines`` (scikit-learn's Gaussian mixture) is not imported here.
"""

from pyroflows.density.estimator import DensityEstimator
from pyroflows.density.training import evaluate, fit_max_likelihood

__all__ = ["DensityEstimator", "evaluate", "fit_max_likelihood"]
