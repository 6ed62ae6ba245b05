"""Flow layers: the math of each family, one file per family.

Importing this package registers every built-in family.
"""

from pyroflows.transforms.actnorm import ActNorm, LocScale
from pyroflows.transforms.autoregressive import Autoregressive, iaf, maf
from pyroflows.transforms.base import Conditioned, Flow, FlowStack, Method, NotInvertibleError
from pyroflows.transforms.cnf import CNF, cnf
from pyroflows.transforms.compiled import Compiled
from pyroflows.transforms.coupling import Coupling, coupling_masks
from pyroflows.transforms.elementwise import Affine, Elementwise, Inverted, Shift
from pyroflows.transforms.glow import glow
from pyroflows.transforms.linear import CholeskyAffine, LULinear
from pyroflows.transforms.planar import Planar
from pyroflows.transforms.radial import Radial
from pyroflows.transforms.spline import RationalQuadratic, nsf, nsf_ar
from pyroflows.transforms.sylvester import Sylvester, sylvester

__all__ = [
    "CNF",
    "ActNorm",
    "Affine",
    "Autoregressive",
    "CholeskyAffine",
    "Compiled",
    "Conditioned",
    "Coupling",
    "Elementwise",
    "Flow",
    "FlowStack",
    "Inverted",
    "LULinear",
    "LocScale",
    "Method",
    "NotInvertibleError",
    "Planar",
    "Radial",
    "RationalQuadratic",
    "Shift",
    "Sylvester",
    "cnf",
    "coupling_masks",
    "glow",
    "iaf",
    "maf",
    "nsf",
    "nsf_ar",
    "sylvester",
]
