"""`bespoke export` (export.py): a learned schedule in the units of stock samplers, checked by running them."""

import json

import pytest
import torch

import bespoke
from bespoke.cli import main
from bespoke.export import schedule_in_units
from bespoke.noise import draw_noise
from bespoke.solvers.schedule import ScheduleSolver
from bespoke.zoo.pretrained import digits_network
from helpers import tiny_diffusers_model

diffusers = pytest.importorskip("diffusers")


def random_schedule(base: str, nfe_range, seed: int = 0) -> ScheduleSolver:
    s = ScheduleSolver(base, nfe_range)
    with torch.no_grad():
        s.log_inc.copy_(0.3 * torch.randn(s.log_inc.shape, generator=torch.Generator().manual_seed(seed)))
    return s


def run_diffusers(scheduler, call, noise, **set_timesteps):
    """The denoising loop of a diffusers pipeline (flow-matching schedulers scale nothing: no init_noise_sigma,
    no scale_model_input)."""
    scheduler.set_timesteps(**set_timesteps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(call(scale(x, t), t), t, x).prev_sample
    return x


@pytest.mark.parametrize("nfe", [4, 9, 16])
def test_exported_timesteps_in_dpm_solver_multistep_reproduce_our_schedule_on_digits_vp(nfe):
    """diffusers' DPM-Solver++(2M) fed the exported integer timesteps = our dpm++2m on the times those integers
    stand for, to float32 precision (measured: 118-134 dB apart). Its final step is first order ('zero' final
    sigma), as ours always is; at < 15 steps its lower_order_final does the same."""
    net, _, _ = digits_network("digits-vp")
    flow = bespoke.load_model("zoo:digits-vp", guidance=None)
    noise, labels = draw_noise((1, 16, 16), 8, seed=3), torch.arange(8)
    units = schedule_in_units(random_schedule("dpm++2m", (4, 16)).at(nfe), flow)
    assert len(units["timesteps"]) == nfe and units["timesteps"][0] == 999
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, prediction_type="epsilon")
    theirs = run_diffusers(sched, lambda x, t: net(x, t.float().expand(8), labels), noise, timesteps=units["timesteps"])
    with torch.no_grad():
        ours = bespoke.solver("dpm++2m", nfe, grid=units["timestep_times"]).sample(flow, noise, labels=labels)
    assert (theirs - ours).abs().max() < 1e-4
    # the rounding to integer timesteps moves the grid by less than half a timestep
    assert max(abs(a - b) for a, b in zip(units["timestep_times"], units["times"])) <= 0.5 / 1000 + 1e-12


def test_exported_sigmas_in_flow_match_euler_reproduce_our_schedule_despite_its_shift(tmp_path):
    """FlowMatchEulerDiscreteScheduler(shift=3) shifts the sigmas it is given; `diffusers-sigmas` undoes that."""
    folder = tiny_diffusers_model(tmp_path / "fm", flow_matching=True)
    flow = bespoke.load_model(f"diffusers:{folder}")
    unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False).eval()
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    assert sched.config.shift == 3.0
    noise = draw_noise((1, 8, 8), 4, seed=1)
    s = random_schedule("euler", (3, 10), seed=2).at(7)
    units = schedule_in_units(s, flow)
    theirs = run_diffusers(sched, lambda x, t: unet(x, t).sample, noise, sigmas=units["diffusers-sigmas"])
    with torch.no_grad():
        ours = s.sample(flow, noise)
    assert (theirs - ours).abs().max() < 1e-5
    assert units["sigmas"][-1] == 0.0 and len(units["sigmas"]) == 8


def test_bespoke_export_prints_each_format_and_refuses_what_has_none(tmp_path, capsys):
    flow = bespoke.load_model("zoo:gmm2d", path="vp-discrete")
    file = tmp_path / "s.safetensors"
    bespoke.save_solvers(file, [random_schedule("unipc", (3, 8)).bind_model(flow)], flow)
    common = ["export", str(file), "--path", "vp-discrete", "--nfe", "5"]
    assert main([*common, "--format", "timesteps"]) == 0
    steps = json.loads(capsys.readouterr().out)
    assert len(steps) == 5 and steps[0] == 999 and steps == sorted(steps, reverse=True)
    assert main([*common, "--format", "sigmas"]) == 0
    sigmas = json.loads(capsys.readouterr().out)
    assert len(sigmas) == 6 and sigmas[-1] == 0 and sigmas == sorted(sigmas, reverse=True)
    assert main([*common, "--format", "json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["times"][0] == 0 and record["times"][-1] == 1 and record["nfe"] == 5
    assert main(["export", str(file), "--nfe", "5"]) == 2  # the file's model is condot-less gmm2d at vp-discrete
    assert "fingerprint" in capsys.readouterr().err
    assert main([*common[:-1], "9"]) == 2
    assert "it has NFE 3-8" in capsys.readouterr().err
    bns = tmp_path / "bns.safetensors"
    bespoke.save_solvers(bns, [bespoke.BNSSolver.from_solver(bespoke.solver("euler", 4), flow)], flow)
    assert main(["export", str(bns), "--path", "vp-discrete", "--nfe", "4"]) == 2
    assert "no stock sampler runs" in capsys.readouterr().err
    assert main(["export", "dpm++2m", "--model", "zoo:digits-cos", "--nfe", "4", "--format", "sigmas"]) == 2
    assert "no finite noise level" in capsys.readouterr().err
    assert main(["export", "dpm++2m", "--model", "zoo:digits-ot", "--nfe", "4", "--format", "timesteps"]) == 2
    assert "takes canonical time" in capsys.readouterr().err


def test_a_schedule_file_serves_every_nfe_of_its_range_in_bespoke_scheduler(tmp_path):
    from bespoke.integrations.diffusers import BespokeScheduler

    flow = bespoke.load_model("zoo:digits-vp", guidance=None)
    s = random_schedule("dpm++2m", (3, 6)).bind_model(flow)
    file = tmp_path / "s.safetensors"
    bespoke.save_solvers(file, [s], flow)
    sched = BespokeScheduler.from_solvers(file, flow)
    assert sched.nfes == [3, 4, 5, 6]
    sched.set_timesteps(5)
    want = torch.tensor(schedule_in_units(s.at(5), flow)["times"][:-1], dtype=torch.float64)
    assert torch.allclose(sched.timesteps.double(), flow.scheduler.timestep(want), atol=1e-3)
