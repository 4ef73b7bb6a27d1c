"""diffusers: `diffusers:DIR` model specs and `BespokeScheduler`, on tiny randomly initialised UNet2DModels
saved in save_pretrained layout (a DDPM v-prediction model and a flow-matching model), and the digits
ε-model against diffusers' own DPMSolverMultistep.

The scheduler checks mirror what diffusers' SchedulerCommonTest asks of every scheduler (public API,
config round trip, step shapes, swapping with from_config), written here in our own code.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import bespoke
from bespoke import BespokeError, cli
from bespoke.flows import velocity_from_prediction
from bespoke.paths import CondOT, VPDiscrete

diffusers = pytest.importorskip("diffusers")
from bespoke.integrations.diffusers import BespokeScheduler  # noqa: E402
from helpers import tiny_diffusers_model  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diffusers")
    return {
        "ddpm": tiny_diffusers_model(tmp / "ddpm"),
        "flow": tiny_diffusers_model(tmp / "flow", flow_matching=True),
    }


def _unet(folder):
    return diffusers.UNet2DModel.from_pretrained(f"{folder}/unet", low_cpu_mem_usage=False).eval()


def _learned(flow, nfe=6):
    """A BNS solver that is not a classical one: dpm++2m's NS form, perturbed."""
    bns = bespoke.BNSSolver.from_solver(bespoke.solver("dpm++2m", nfe), flow)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in bns.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return bns


# --- diffusers:DIR --------------------------------------------------------------------------------


def test_ddpm_folder_is_read_as_its_schedule_says(folders):
    flow = bespoke.load_model(f"diffusers:{folders['ddpm']}")
    assert isinstance(flow.scheduler, VPDiscrete) and flow.sample_shape == (1, 8, 8)
    assert flow.ode_end == pytest.approx(0.999)  # timestep 0 of 0..999
    ddpm = diffusers.DDPMScheduler.from_pretrained(f"{folders['ddpm']}/scheduler")
    assert torch.equal(flow.scheduler.alphas_cumprod, ddpm.alphas_cumprod.double())
    assert flow.fingerprint == bespoke.load_model(f"diffusers:{folders['ddpm']}").fingerprint
    x, t = torch.randn(3, 1, 8, 8), torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():
        v = _unet(folders["ddpm"])(x, flow.scheduler.timestep(t).float().expand(3)).sample
        expected = velocity_from_prediction("v", v, x, t, flow.scheduler)
        torch.testing.assert_close(flow(t, x), expected, rtol=1e-5, atol=1e-6)


def test_flow_matching_folder_is_condot_with_the_velocity_negated(folders):
    flow = bespoke.load_model(f"diffusers:{folders['flow']}")
    assert isinstance(flow.scheduler, CondOT) and flow.ode_end == 1.0
    x, t = torch.randn(2, 1, 8, 8), torch.tensor(0.25, dtype=torch.float64)
    with torch.no_grad():
        v = _unet(folders["flow"])(x, torch.full((2,), 750.0)).sample  # s = 1 - t = 0.75, timestep s * 1000
        torch.testing.assert_close(flow(t, x), -v)


def test_sampler_options_are_ignored_with_one_log_line(folders, caplog):
    with caplog.at_level(logging.INFO, logger="bespoke"):
        bespoke.load_model(f"diffusers:{folders['ddpm']}")
    lines = [r.getMessage() for r in caplog.records if "ignoring sampler options" in r.getMessage()]
    assert len(lines) == 1 and "clip_sample" in lines[0]


def _edit_scheduler(folder, tmp_path, **changes):
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    path = out / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    "change, words",
    [
        ({"prediction_type": "banana"}, ["prediction_type 'banana'", "epsilon, v_prediction, sample"]),
        ({"rescale_betas_zero_snr": True}, ["zero terminal SNR", "not supported", "rescale_betas_zero_snr = true"]),
        ({"trained_betas": [1e-4] * 999 + [1.0]}, ["zero terminal SNR", "not supported", "from its betas"]),
        ({"beta_schedule": "nosuch"}, ["cannot build the training schedule"]),
    ],
)
def test_configs_that_change_the_model_unsupported_are_refused(folders, tmp_path, change, words):
    with pytest.raises(BespokeError) as e:
        bespoke.load_model(f"diffusers:{_edit_scheduler(folders['ddpm'], tmp_path, **change)}")
    for w in words:
        assert w in str(e.value)


def test_bad_folders_are_refused(folders, tmp_path):
    with pytest.raises(BespokeError, match="no such directory"):
        bespoke.load_model(f"diffusers:{tmp_path / 'none'}")
    with pytest.raises(BespokeError, match="no unet/ or transformer/"):
        bespoke.load_model(f"diffusers:{tmp_path}")
    import shutil

    shutil.copytree(f"{folders['ddpm']}/unet", tmp_path / "only" / "unet")
    with pytest.raises(BespokeError, match="scheduler_config.json"):
        bespoke.load_model(f"diffusers:{tmp_path / 'only'}")


def test_gt_train_eval_commands_through_a_diffusers_folder(folders, tmp_path, capsys):
    spec = f"diffusers:{folders['ddpm']}"
    gt, bns = tmp_path / "gt", tmp_path / "bns.safetensors"
    steps = [
        ["gt", "--model", spec, "--num", "32", "--shard-size", "16", "--out", gt, "--quiet"],
        [
            "train",
            "--model",
            spec,
            "--solver",
            "bns",
            "--nfe",
            "4",
            "--gt",
            gt,
            "--val-samples",
            "8",
            "--iterations",
            "3",
            "--out",
            bns,
            "--quiet",
        ],
        [
            "eval",
            "--model",
            spec,
            "--gt",
            gt,
            "--num",
            "8",
            "--solvers",
            f"euler,dpm++2m,{bns}",
            "--nfe",
            "4",
            "--quiet",
        ],
    ]
    for argv in steps:
        assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "bns.safetensors" in out and spec in out


# --- BespokeScheduler -----------------------------------------------------------------------------


def _scheduler(folder, nfes=(6,)):
    flow = bespoke.load_model(f"diffusers:{folder}")
    return flow, BespokeScheduler.from_solvers([_learned(flow, n) for n in nfes], flow)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_scheduler_in_the_ddpm_pipeline_loop_equals_our_sampler(folders, kind):
    flow, scheduler = _scheduler(folders[kind])
    unet = _unet(folders[kind])
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), num_inference_steps=6, output_type="np")
    noise = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))  # what the pipeline drew
    with torch.no_grad():
        ours = _learned(flow).sample(flow, noise)
    expected = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(images.images, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["ddpm", "flow"])
def test_scheduler_round_trips_through_save_pretrained(folders, kind, tmp_path):
    flow, scheduler = _scheduler(folders[kind], nfes=(4, 6))
    scheduler.save_pretrained(tmp_path)
    again = BespokeScheduler.from_pretrained(tmp_path)
    public = lambda s: {k: v for k, v in s.config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again) == public(scheduler) and again.nfes == [4, 6]
    x = torch.randn(2, 1, 8, 8)
    for s in (scheduler, again):
        s.set_timesteps(4)
    torch.testing.assert_close(again.timesteps, scheduler.timesteps, rtol=0, atol=0)
    outs = []
    for s in (scheduler, again):
        y = x
        for t in s.timesteps:
            y = s.step(torch.sin(y + t / 1000), t, y).prev_sample
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("kind, first", [("ddpm", 999.0), ("flow", 1000.0)])
def test_scheduler_public_api(folders, kind, first):
    flow, scheduler = _scheduler(folders[kind], nfes=(4, 6))
    for name in ("init_noise_sigma", "scale_model_input", "step", "set_timesteps", "set_begin_index", "add_noise"):
        assert hasattr(scheduler, name), name
    assert scheduler.order == 1 and len(scheduler) == 1000
    assert "DDPMScheduler" in scheduler._compatibles
    with pytest.raises(BespokeError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 1, 8, 8), 999, torch.zeros(1, 1, 8, 8))
    scheduler.set_timesteps(6)
    ts = scheduler.timesteps
    assert ts.dtype == torch.float32 and len(ts) == 6 and ts[0] == first and bool(torch.all(ts[1:] < ts[:-1]))
    sample = torch.randn(5, 1, 8, 8)
    assert scheduler.scale_model_input(sample, ts[0]) is sample
    out = scheduler.step(torch.randn(5, 1, 8, 8), ts[0], sample)
    assert out.prev_sample.shape == sample.shape and scheduler.step_index == 1
    assert isinstance(scheduler.step(torch.randn(5, 1, 8, 8), ts[1], out.prev_sample, return_dict=False), tuple)
    with pytest.raises(BespokeError, match="has NFE 4, 6"):
        scheduler.set_timesteps(5)
    with pytest.raises(BespokeError, match="custom `timesteps`"):
        scheduler.set_timesteps(timesteps=[999, 500])
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.7)  # what flow pipelines pass: accepted
    assert scheduler.num_inference_steps == 4
    scheduler.set_begin_index(0)
    assert scheduler.begin_index == 0


def test_add_noise_matches_diffusers_at_integer_timesteps(folders):
    _, scheduler = _scheduler(folders["ddpm"])
    ddpm = diffusers.DDPMScheduler.from_pretrained(f"{folders['ddpm']}/scheduler")
    x, noise, t = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(scheduler.add_noise(x, noise, t), ddpm.add_noise(x, noise, t), rtol=1e-5, atol=1e-6)


def test_from_config_swaps_both_ways(folders):
    _, scheduler = _scheduler(folders["ddpm"])
    ddpm = diffusers.DDPMScheduler.from_config(scheduler.config)
    assert ddpm.config.prediction_type == "v_prediction" and ddpm.config.num_train_timesteps == 1000
    empty = BespokeScheduler.from_config(diffusers.DDPMScheduler.from_pretrained(f"{folders['ddpm']}/scheduler").config)
    assert empty.nfes == [] and empty.config.prediction_type == "v_prediction"
    with pytest.raises(BespokeError, match="from_solvers"):
        empty.set_timesteps(8)
    flow_config = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(f"{folders['flow']}/scheduler").config
    assert BespokeScheduler.from_config(flow_config).config.prediction_type == "flow_prediction"


def test_zoo_vp_model_takes_a_scheduler_with_its_prediction_type():
    flow = bespoke.load_model("zoo:digits-vp", guidance=None)
    scheduler = BespokeScheduler.from_solvers(bespoke.solver("dpm++2m", 8), flow)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.nfes == [8]
    with pytest.raises(BespokeError, match="DDPM-type"):
        BespokeScheduler.from_solvers(bespoke.solver("euler", 4), bespoke.load_model("zoo:gmm2d"))


def test_ground_truth_agrees_with_dpm_solver_at_1000_steps():
    """Both approximate the same ODE: our dopri5 on the discrete schedule vs diffusers' DPM-Solver++(2M)
    with 1,000 steps (every training timestep) ending at sigma = 0, on the digits ε-model. The states run
    in float64 on both sides. At rtol = atol = 1e-7 they agree to 9e-5 RMSE; our default tolerance
    (1e-5) is itself about 1e-3 RMSE from that tighter solution on this model, so it is not used here."""
    from bespoke.zoo.pretrained import digits_network

    net, _, _ = digits_network("digits-vp")
    noise, labels = bespoke.draw_noise((1, 16, 16), 4, seed=5, dtype=torch.float64), torch.arange(4)
    flow = bespoke.load_model("zoo:digits-vp", guidance=None)
    gt = bespoke.ground_truth(flow, noise, labels=labels, rtol=1e-7, atol=1e-7)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", prediction_type="epsilon", final_sigmas_type="zero", timestep_spacing="trailing"
    )
    sched.set_timesteps(1000)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(x.float(), t.float().expand(4), labels).double(), t, x).prev_sample
    assert float(bespoke.rmse(x, gt.samples).mean()) < 1e-3 / 5


def test_class_conditional_unet_takes_our_labels_as_class_labels(tmp_path):
    folder = tiny_diffusers_model(tmp_path / "cond", classes=3)
    flow = bespoke.load_model(f"diffusers:{folder}")
    assert flow.cond_keys == ("labels",) and flow.num_classes == 3
    x, t, labels = torch.randn(3, 1, 8, 8), torch.tensor(0.5, dtype=torch.float64), torch.tensor([0, 2, 1])
    with torch.no_grad():
        v = _unet(folder)(x, flow.scheduler.timestep(t).float().expand(3), class_labels=labels).sample
        torch.testing.assert_close(flow(t, x, labels=labels), velocity_from_prediction("v", v, x, t, flow.scheduler))
    cache = bespoke.generate_gt(flow, tmp_path / "gt", num=4, shard_size=4, quiet=True)  # labels drawn per pair
    assert cache.labels is not None and cache.labels.max() < 3


def test_scheduler_checks_of_the_diffusers_common_suite(folders, tmp_path):
    """Outputs equivalence (dict vs tuple), step shapes at two timesteps, add_noise keeps shape and dtype,
    trained betas round trip, and a saved BespokeScheduler loads as a compatible diffusers scheduler."""
    flow, scheduler = _scheduler(folders["ddpm"])
    scheduler.set_timesteps(6)
    sample, residual = torch.randn(2, 1, 8, 8), 0.1 * torch.randn(2, 1, 8, 8)
    t0, t1 = scheduler.timesteps[:2]
    a = scheduler.step(residual, t0, sample).prev_sample
    scheduler.set_timesteps(6)
    (b,) = scheduler.step(residual, t0, sample, return_dict=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert scheduler.step(residual, t1, b).prev_sample.shape == sample.shape
    noisy = scheduler.add_noise(sample.double(), residual.double(), torch.tensor([10, 900]))
    assert noisy.shape == sample.shape and noisy.dtype == torch.float64

    vp = BespokeScheduler.from_solvers(bespoke.solver("ddim", 6), bespoke.load_model("zoo:digits-vp", guidance=None))
    vp.save_pretrained(tmp_path / "vp")
    again = BespokeScheduler.from_pretrained(tmp_path / "vp")
    assert again.config.trained_betas == vp.config.trained_betas and len(again.config.trained_betas) == 1000
    assert again.betas.tolist() == vp.betas.tolist()  # diffusers' test_trained_betas
    ddpm = diffusers.DDPMScheduler.from_pretrained(tmp_path / "vp")  # a compatible scheduler reads the same model
    ours = vp._schedule.scheduler.alphas_cumprod
    assert ours.numel() == 1000
    torch.testing.assert_close(ddpm.alphas_cumprod.double(), ours)


def test_scheduler_exposes_the_ddpm_tables_that_pipelines_and_training_utils_read(folders):
    """betas, alphas, alphas_cumprod as DDPMScheduler has them (compute_snr reads them); a flow-matching
    BespokeScheduler has none, like FlowMatchEulerDiscreteScheduler."""
    from diffusers.training_utils import compute_snr

    _, scheduler = _scheduler(folders["ddpm"])
    ddpm = diffusers.DDPMScheduler.from_pretrained(f"{folders['ddpm']}/scheduler")
    for name in ("betas", "alphas", "alphas_cumprod"):
        got, want = getattr(scheduler, name), getattr(ddpm, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(compute_snr(scheduler, t), compute_snr(ddpm, t))
    _, flow_scheduler = _scheduler(folders["flow"])
    assert not hasattr(flow_scheduler, "alphas_cumprod")


def test_starting_mid_schedule_is_refused_with_the_reason(folders):
    """img2img/inpainting with strength < 1 call set_begin_index(k > 0); a bespoke solver runs whole."""
    _, scheduler = _scheduler(folders["ddpm"])
    scheduler.set_timesteps(6)
    scheduler.set_begin_index(0)
    with pytest.raises(BespokeError, match=r"cannot start at step 2: .*strength=1\.0"):
        scheduler.set_begin_index(2)


def test_add_noise_reads_its_tables_on_the_cpu_whatever_the_samples_device(folders, monkeypatch):
    """The schedule's tables are CPU tensors; samples on another device (here `meta`, as a stand-in for CUDA)
    get the coefficients moved to them, never the timesteps moved away from the tables."""
    _, scheduler = _scheduler(folders["ddpm"])
    path = scheduler._schedule.scheduler
    seen = []
    real_alpha = type(path).alpha
    monkeypatch.setattr(type(path), "alpha", lambda self, t: seen.append(t.device.type) or real_alpha(self, t))
    x = torch.empty(3, 1, 8, 8, device="meta")
    out = scheduler.add_noise(x, torch.empty_like(x), torch.tensor([0, 500, 999]))
    assert out.device.type == "meta" and out.shape == x.shape and seen == ["cpu"]
    if torch.cuda.is_available():
        x = torch.randn(3, 1, 8, 8)
        t = torch.tensor([0, 500, 999])
        on_gpu = scheduler.add_noise(x.cuda(), x.cuda(), t.cuda()).cpu()
        torch.testing.assert_close(on_gpu, scheduler.add_noise(x, x, t))
