"""Analytic Gaussian-mixture flows: the closed-form ideal velocity under any scheduler.

Data x1 ~ sum_k pi_k N(mu_k, s_k^2 I), noise x0 ~ N(0, I), x_t = alpha_t x1 + sigma_t x0. Given x_t
and component k, (x1, x0, x_t) are jointly Gaussian with v_k = alpha^2 s_k^2 + sigma^2, so

    E[x1 | x, k] = mu_k + alpha s_k^2 (x - alpha mu_k) / v_k
    E[x0 | x, k] = sigma (x - alpha mu_k) / v_k
    p(k | x) ∝ pi_k N(x; alpha mu_k, v_k I)

and the ideal (marginal) velocity is u = alpha' E[x1|x] + sigma' E[x0|x]. We write the second term
with sigma sigma', which stays finite where sigma' does not (VP paths at t = 1). This is the test
oracle of the whole library: exact ground truth, exact scheduler changes, and no weights.

Class-conditional: each component carries a class label; `labels` restricts the mixture to the
components of that class, and the null label (= num_classes) keeps the full mixture.
"""

from __future__ import annotations

import hashlib
import math

import torch

from ..errors import BespokeError
from ..flows import Flow, Guidance, guided
from ..paths import CondOT, Scheduler

__all__ = ["GaussianMixture", "gmm_flow", "gmm2d", "random_mixture"]


class GaussianMixture:
    """An isotropic Gaussian mixture in R^d with optional class labels per component."""

    def __init__(self, means, stds, weights=None, classes=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise BespokeError(f"means must have shape (components, dim), got {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        if not torch.all(self.stds > 0):
            raise BespokeError("every component std must be > 0")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or not torch.all(w > 0):
            raise BespokeError(f"weights must be {k} positive numbers")
        self.weights = w / w.sum()
        c = torch.zeros(k, dtype=torch.long) if classes is None else torch.as_tensor(classes, dtype=torch.long)
        if c.shape != (k,) or c.min() < 0:
            raise BespokeError(f"classes must be {k} non-negative integers")
        self.classes = c
        self.num_classes = int(c.max()) + 1

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def null_label(self) -> int:
        return self.num_classes

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for a in (self.means, self.stds, self.weights, self.classes):
            h.update(a.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def sample(self, n: int, generator: torch.Generator | None = None, labels=None) -> torch.Tensor:
        """Exact data samples x1 (float64), optionally of the given classes."""
        logits = torch.log(self.weights).expand(n, -1)
        if labels is not None:
            logits = logits + self._class_mask(torch.as_tensor(labels), torch.float64)
        k = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * noise

    def _class_mask(self, labels: torch.Tensor, dtype) -> torch.Tensor:
        """0 where a component is allowed for the sample's label, -inf where not (null: all)."""
        labels = labels.to("cpu").long().reshape(-1, 1)
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_label):
            raise BespokeError(f"labels must lie in 0..{self.null_label} ({self.null_label} = unconditional)")
        allowed = (self.classes[None, :] == labels) | (labels == self.null_label)
        return torch.where(allowed, 0.0, -math.inf).to(dtype)

    def velocity(self, scheduler: Scheduler):
        """The ideal velocity fn(t, x, labels=None) of this mixture under `scheduler`."""

        def u(t, x, labels=None):
            shape = x.shape
            x = x.reshape(shape[0], -1)
            dev, dt = x.device, x.dtype
            tt = t.to("cpu", torch.float64)
            a, s = scheduler.alpha(tt), scheduler.sigma(tt)
            da, sds = scheduler.d_alpha(tt), scheduler.sigma_d_sigma(tt)
            a, s, da, sds = (c.to(dev, dt)[:, None] for c in (a, s, da, sds))
            mu, var1 = self.means.to(dev, dt), (self.stds**2).to(dev, dt)
            v = a * a * var1[None, :] + s * s  # (B, K)
            diff = x[:, None, :] - a[:, :, None] * mu[None]  # (B, K, d)
            logp = torch.log(self.weights.to(dev, dt))[None] - 0.5 * (
                (diff * diff).sum(-1) / v + x.shape[1] * torch.log(v)
            )
            if labels is not None:
                logp = logp + self._class_mask(labels, dt).to(dev)
            w = torch.softmax(logp, dim=-1)  # p(k | x)
            r = diff / v[:, :, None]  # (x - alpha mu_k) / v_k
            x1_hat = (w[:, :, None] * (mu[None] + (a * var1[None, :])[:, :, None] * r)).sum(1)
            out = da * x1_hat + sds * (w[:, :, None] * r).sum(1)  # alpha' E[x1|x] + sigma sigma' E[x0|x]/sigma
            return out.reshape(shape)

        return u


def gmm_flow(
    mixture: GaussianMixture,
    scheduler: Scheduler | None = None,
    *,
    name: str = "zoo:gmm",
    guidance: Guidance | None = None,
) -> Flow:
    """The Flow of a Gaussian mixture under `scheduler` (CondOT by default)."""
    scheduler = scheduler or CondOT()
    field = mixture.velocity(scheduler)
    if guidance is not None:
        if set(guidance.null) - {"labels"}:
            raise BespokeError("a Gaussian-mixture flow is conditioned on labels only")
        guidance = Guidance(guidance.weight, guidance.convention, {"labels": mixture.null_label})
        net = guided(lambda x, t, **c: field(t, x, **c), guidance, ("labels",))
        velocity = lambda t, x, **c: net(x, t, **c)  # noqa: E731
    else:
        velocity = field
    return Flow(
        velocity,
        scheduler=scheduler,
        sample_shape=(mixture.dim,),
        cond_keys=("labels",),
        name=name,
        data_range=2.0,
        fingerprint=f"{mixture.fingerprint()}-{scheduler!r}",
        guidance=guidance,
        num_classes=mixture.num_classes,
    )


def gmm2d_mixture() -> GaussianMixture:
    """Six anisotropically weighted, well separated 2-D components in [-1, 1]^2, three classes."""
    angles = torch.arange(6, dtype=torch.float64) * (math.pi / 3) + 0.3
    radii = torch.tensor([0.75, 0.55, 0.8, 0.6, 0.7, 0.5], dtype=torch.float64)
    means = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], 1)
    stds = torch.tensor([0.06, 0.1, 0.08, 0.05, 0.12, 0.07], dtype=torch.float64)
    weights = torch.tensor([0.25, 0.1, 0.2, 0.15, 0.2, 0.1], dtype=torch.float64)
    return GaussianMixture(means, stds, weights, classes=[0, 1, 2, 0, 1, 2])


def random_mixture(dim: int, components: int = 8, seed: int = 0) -> GaussianMixture:
    """A seeded random mixture in R^dim with means in [-0.8, 0.8]^dim (one class per component)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(components, dim, generator=g, dtype=torch.float64) * 1.6 - 0.8
    stds = 0.05 + 0.1 * torch.rand(components, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(components, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights, classes=torch.arange(components))


def gmm2d(scheduler: Scheduler | None = None, guidance: Guidance | None = None) -> Flow:
    return gmm_flow(gmm2d_mixture(), scheduler, name="zoo:gmm2d", guidance=guidance)
