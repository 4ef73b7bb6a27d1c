"""bespoke-solvers: learned ODE solvers for pre-trained diffusion and flow models.

flow = bespoke.load_model("zoo:gmm2d")
s = bespoke.solver("dpm++2m", nfe=8)
x = s.sample(flow, noise)
gt = bespoke.ground_truth(flow, noise)
bespoke.psnr(x, gt.samples)

pairs = bespoke.generate_gt(flow, "gt-dir", num=1032)           # cached dopri5 pairs
bns = bespoke.train_bns(flow, pairs.slice(512), pairs.slice(0, 512), nfe=8)
bespoke.save_solvers("bns.safetensors", [bns], flow)

traj = bespoke.generate_gt(flow, "traj-dir", num=1024, seed=1, trajectory=65)  # dense trajectories
rk2 = bespoke.train_bespoke(flow, traj, pairs.slice(0, 512), nfe=8, order=2)    # RK2-Bespoke
sch = bespoke.train_schedule(flow, pairs.slice(512), pairs.slice(0, 512), "dpm++2m", "4-16")  # any NFE 4..16
sch.at(6).sample(flow, noise)
"""

from . import paths
from ._version import __version__
from .errors import BespokeError, NonFiniteVelocity
from .fd import class_accuracy, fd_digits
from .flows import Flow, Guidance, from_network
from .metrics import EvalResult, evaluate, psnr, rmse
from .models import load_model
from .noise import draw_noise
from .solvers import SOLVER_NAMES, NSSolver, Solver, solver
from .solvers.adaptive import GroundTruth, ground_truth
from .solvers.bns import BNSSolver
from .solvers.files import load_solver, load_solvers, save_solvers
from .solvers.guided import GuidedBNSSolver
from .solvers.scale_time import BespokeSolver
from .solvers.schedule import ScheduleSolver
from .train import GTCache, generate_gt, load_gt
from .train.bespoke import train_bespoke
from .train.bns import train_bns
from .train.guided import train_bns_guided
from .train.loop import FitConfig
from .train.schedule import train_schedule

__all__ = [
    "BespokeError",
    "NonFiniteVelocity",
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
    "BNSSolver",
    "train_bns",
    "GuidedBNSSolver",
    "train_bns_guided",
    "BespokeSolver",
    "train_bespoke",
    "ScheduleSolver",
    "train_schedule",
    "FitConfig",
    "generate_gt",
    "load_gt",
    "GTCache",
    "save_solvers",
    "load_solver",
    "load_solvers",
    "__version__",
]
