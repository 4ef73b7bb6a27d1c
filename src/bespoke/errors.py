"""The one exception type users see for bad input: its message names the problem and the fix."""


class BespokeError(ValueError):
    """Bad input (unknown name, wrong shape, unsupported NFE, corrupt file, ...)."""


class NonFiniteVelocity(BespokeError):
    """The model returned NaN/inf: at a time where its path is singular, or from bad inputs."""


class SingularEnd(NonFiniteVelocity):
    """The model cannot be evaluated at the data end of its path (VP-type paths at t = 1): a solver that
    evaluates there (heun, rk4) cannot run on this model at all."""
