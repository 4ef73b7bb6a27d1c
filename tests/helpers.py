"""Test helpers shared by several test modules."""

import torch

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


def tiny_diffusers_model(folder, *, flow_matching: bool = False, prediction: str = "v_prediction", classes=None):
    """Save a tiny randomly initialised diffusers UNet2DModel (1x8x8 samples) with a DDPMScheduler (or a
    FlowMatchEulerDiscreteScheduler) in save_pretrained layout: folder/unet, folder/scheduler."""
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        num_class_embeds=classes,
    )
    unet.save_pretrained(f"{folder}/unet")
    if flow_matching:
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        scheduler = diffusers.DDPMScheduler(beta_schedule="linear", prediction_type=prediction, clip_sample=True)
    scheduler.save_pretrained(f"{folder}/scheduler")
    return folder
