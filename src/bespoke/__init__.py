"""bespoke-solvers: learned ODE solvers for pre-trained diffusion and flow models.

flow = bespoke.load_model("zoo:gmm2d")
s = bespoke.solver("dpm++2m", nfe=8)
x = s.sample(flow, noise)
gt = bespoke.ground_truth(flow, noise)
bespoke.psnr(x, gt.samples)
"""

from . import paths
from .errors import BespokeError
from .fd import class_accuracy, fd_digits
from .flows import Flow, Guidance, from_network
from .metrics import EvalResult, evaluate, psnr, rmse
from .noise import draw_noise
from .solvers import SOLVER_NAMES, NSSolver, Solver, solver
from .solvers.adaptive import GroundTruth, ground_truth
from .zoo import load_model

__version__ = "0.1.0"

__all__ = [
    "BespokeError",
    "Flow",
    "Guidance",
    "from_network",
    "paths",
    "load_model",
    "solver",
    "SOLVER_NAMES",
    "Solver",
    "NSSolver",
    "ground_truth",
    "GroundTruth",
    "psnr",
    "rmse",
    "evaluate",
    "EvalResult",
    "draw_noise",
    "fd_digits",
    "class_accuracy",
    "__version__",
]
