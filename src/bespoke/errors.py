"""The one exception type users see for bad input: its message names the problem and the fix."""


class BespokeError(ValueError):
    """Bad input (unknown name, wrong shape, unsupported NFE, corrupt file, ...)."""


class NonFiniteVelocity(BespokeError):
    """The model returned NaN/inf: at a time where its path is singular, or from bad inputs."""
