"""The bundled digits models: loading, shapes, parameterisation, fingerprints, diffusers interop.

Nothing here trains a model: the tests use the weights that ship inside the package.
"""

import shutil

import pytest
import torch

import bespoke
from bespoke import BespokeError
from bespoke.io import weights_fingerprint as fingerprint
from bespoke.noise import draw_noise
from bespoke.paths import CondOT, Cosine, VPDiscrete
from bespoke.zoo.pretrained import DIGITS_MODELS, digits_network, read_weights, weights_path

EXPECTED = {"digits-ot": (CondOT, "velocity"), "digits-vp": (VPDiscrete, "eps"), "digits-cos": (Cosine, "v")}


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_loads_by_name_with_its_shapes_and_parameterisation(name):
    flow = bespoke.load_model(f"zoo:{name}", guidance=None)
    path_type, prediction = EXPECTED[name]
    assert isinstance(flow.scheduler, path_type) and flow.info["recipe"]["prediction"] == prediction
    assert flow.sample_shape == (1, 16, 16) and flow.num_classes == 10 and flow.cond_keys == ("labels",)
    x = torch.randn(4, 1, 16, 16)
    u = flow(0.5, x, labels=torch.arange(4))
    assert u.shape == x.shape and u.dtype == torch.float32 and torch.isfinite(u).all()
    assert flow.ode_end == (999 / 1000 if name == "digits-vp" else 1.0)


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_fingerprint_is_a_stable_hash_of_the_weights(name):
    a = bespoke.load_model(f"zoo:{name}").fingerprint
    read_weights.cache_clear()
    state, _, _ = read_weights(weights_path(name))
    assert a == bespoke.load_model(f"zoo:{name}").fingerprint == fingerprint(state)
    state = dict(state)
    key = next(iter(state))
    state[key] = state[key] + 1e-3
    assert fingerprint(state) != a


@pytest.mark.parametrize("name", DIGITS_MODELS)
def test_default_guidance_is_recorded_with_the_model_and_used(name):
    flow = bespoke.load_model(f"zoo:{name}")
    recorded = flow.info["default_guidance"]
    assert flow.guidance.weight == recorded["weight"] and flow.guidance.convention == recorded["convention"]
    with pytest.raises(BespokeError, match="labels"):
        flow(0.5, torch.randn(2, 1, 16, 16))
    assert bespoke.load_model(f"zoo:{name}", guidance=1.5).guidance.weight == 1.5


def test_weights_are_safetensors_and_a_corrupt_file_is_refused(tmp_path):
    src = weights_path("digits-ot")
    assert src.read_bytes()[8:9] == b"{"  # safetensors: 8-byte header length, then the JSON header
    bad = tmp_path / "digits-ot.safetensors"
    shutil.copy(src, bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(BespokeError, match="not a valid bespoke weights file"):
        read_weights(bad)
    with pytest.raises(BespokeError, match="missing"):
        read_weights(tmp_path / "nothing.safetensors")
    with pytest.raises(BespokeError, match="its own path"):
        bespoke.load_model("zoo:digits-ot", path="cosine")


@pytest.mark.parametrize("scheduler_name, steps", [("DPMSolverMultistepScheduler", 25), ("DDIMScheduler", 50)])
def test_digits_vp_runs_unchanged_under_diffusers_schedulers(scheduler_name, steps):
    """diffusers' own schedulers (DDPM convention, integer timesteps) sample zoo:digits-vp and land on
    our ground truth: the ODE from timestep 999 to 0, then the data prediction there."""
    diffusers = pytest.importorskip("diffusers")
    net, _, _ = digits_network("digits-vp")
    noise, labels = draw_noise((1, 16, 16), 8, seed=3), torch.arange(8)
    gt = bespoke.ground_truth(bespoke.load_model("zoo:digits-vp", guidance=None), noise, labels=labels)
    cls = getattr(diffusers, scheduler_name)
    kw = {"timestep_spacing": "trailing"} if scheduler_name == "DDIMScheduler" else {}  # start at 999 as we do
    sched = cls(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon", **kw)
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = net(sched.scale_model_input(x, t), t.float().expand(8), labels)
            x = sched.step(eps, t, x).prev_sample
    assert bespoke.psnr(x, gt) > 30
