"""Test helpers shared by several test modules."""

import bespoke


class Killed(Exception):
    pass


def killing_flow(flow, after: int):
    """The same flow, but the process "dies" at its `after`-th evaluation."""
    calls = {"n": 0}

    def velocity(t, x, **cond):
        calls["n"] += 1
        if calls["n"] == after:
            raise Killed
        return flow._velocity(t, x, **cond)

    return bespoke.Flow(
        velocity,
        scheduler=flow.scheduler,
        sample_shape=flow.sample_shape,
        cond_keys=flow.cond_keys,
        name=flow.name,
        fingerprint=flow.fingerprint,
        num_classes=flow.num_classes,
    )
