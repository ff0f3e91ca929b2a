"""UNet and trimap branch vs diffusers' UNet2DConditionModel and ControlNetModel, through the
same key conversion users run (minibldm.convert)."""
import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import max_abs, randomize

from minibldm import fast
from minibldm.config import UNetConfig
from minibldm.fast.conv import MatmulConv2d
from minibldm.control import ControlNet
from minibldm.convert import (control_from_diffusers, control_to_diffusers, unet_from_diffusers,
                              unet_to_diffusers, unet_config_from_state_dict)
from minibldm.convert.checkpoint import unet_config_from_diffusers
from minibldm.io import load_into
from minibldm.unet import UNet

diffusers = pytest.importorskip("diffusers")

# Three levels like SD's four: attention on the first two, none on the last.
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2),
                  num_heads=2, context_dim=24, norm_num_groups=8, num_res_blocks=2)


def diffusers_kwargs(cfg: UNetConfig) -> dict:
    levels = len(cfg.channel_mult)
    attn = [2 ** i in cfg.attention_resolutions for i in range(levels)]
    return dict(block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
                down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
                layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
                attention_head_dim=cfg.num_heads,  # diffusers' SD 1.x naming: this is the head count
                norm_num_groups=cfg.norm_num_groups, in_channels=cfg.in_channels,
                transformer_layers_per_block=cfg.transformer_depth)


def diffusers_unet(cfg: UNetConfig):
    kw = diffusers_kwargs(cfg)
    attn = [t.startswith("CrossAttn") for t in kw["down_block_types"]]
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return diffusers.UNet2DConditionModel(out_channels=cfg.out_channels, up_block_types=up, **kw)


def diffusers_controlnet(cfg: UNetConfig):
    return diffusers.ControlNetModel(conditioning_channels=cfg.hint_channels, **diffusers_kwargs(cfg))


def inputs(cfg: UNetConfig, size: int = 16, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    t = torch.tensor([981, 1])[:batch]
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    hint = torch.rand(batch, cfg.hint_channels, size * 8, size * 8, generator=g)
    return x, t, ctx, hint


def converted_pair(cfg=TINY):
    ref_unet, ref_ctrl = randomize(diffusers_unet(cfg), 1).eval(), randomize(diffusers_controlnet(cfg), 2).eval()
    unet = load_into(UNet(cfg), unet_from_diffusers(ref_unet.state_dict(), cfg), "diffusers unet", "UNet")
    ctrl = load_into(ControlNet(cfg), control_from_diffusers(ref_ctrl.state_dict(), cfg),
                     "diffusers controlnet", "control branch")
    return ref_unet, ref_ctrl, unet.eval(), ctrl.eval()


@torch.no_grad()
def test_unet_and_control_match_diffusers():
    ref_unet, ref_ctrl, unet, ctrl = converted_pair()
    x, t, ctx, hint = inputs(TINY)
    # UNet without control
    want = ref_unet(x, t, ctx).sample
    got = unet(x, t, ctx)
    assert want.abs().mean() > 0.1
    assert max_abs(got, want) <= 1e-5
    # control residuals one by one
    down, mid = ref_ctrl(x, t, ctx, controlnet_cond=hint, return_dict=False)
    res = ctrl(x, hint, t, ctx)
    assert len(res) == len(down) + 1 == len(unet.input_blocks) + 1 == 10
    for i, (a, b) in enumerate(zip(res, list(down) + [mid])):
        assert b.abs().mean() > 1e-3, i
        assert max_abs(a, b) <= 1e-5, i
    # UNet with the residuals
    want = ref_unet(x, t, ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    got_c = unet(x, t, ctx, control=res)
    assert max_abs(got_c, got) > 1e-3  # the residuals change the output
    assert max_abs(got_c, want) <= 1e-5


@torch.no_grad()
def test_matmul_route_of_the_3x3_convs_matches_diffusers():
    """fast.optimize's matrix-product route (taken at SD size only by default), forced onto
    every 3x3 stride-1 conv of the small networks here: the UNet and the branch still match
    diffusers, and no state-dict key changed."""
    ref_unet, ref_ctrl, unet, ctrl = converted_pair()
    keys = set(unet.state_dict()), set(ctrl.state_dict())
    fast.optimize(SimpleNamespace(unet=unet, control=ctrl, autoencoder=torch.nn.Module()),
                  big_weight=0, small_grid=16 * 16)
    routed = [m for m in unet.modules() if isinstance(m, MatmulConv2d)]
    assert len(routed) >= 20
    assert (set(unet.state_dict()), set(ctrl.state_dict())) == keys
    x, t, ctx, hint = inputs(TINY)
    down, mid = ref_ctrl(x, t, ctx, controlnet_cond=hint, return_dict=False)
    want = ref_unet(x, t, ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    assert max_abs(unet(x, t, ctx, control=ctrl(x, hint, t, ctx)), want) <= 1e-5


def test_scalar_timestep_broadcasts():
    unet = UNet(TINY).eval()
    x, t, ctx, _ = inputs(TINY)
    with torch.no_grad():
        assert max_abs(unet(x, torch.tensor(500), ctx), unet(x, torch.tensor([500, 500]), ctx)) == 0


def test_conversion_round_trips():
    ref_unet, ref_ctrl, _, _ = converted_pair()
    for ref, there, back in ((ref_unet, unet_from_diffusers, unet_to_diffusers),
                             (ref_ctrl, control_from_diffusers, control_to_diffusers)):
        sd = ref.state_dict()
        assert set(back(there(sd, TINY), TINY)) == set(sd)


def test_copy_from_unet_initialises_control():
    unet = randomize(UNet(TINY), 3)
    ctrl = ControlNet(TINY).copy_from_unet(unet)
    for k, v in unet.state_dict().items():
        if k.startswith(("time_embed", "input_blocks", "middle_block")):
            assert torch.equal(ctrl.state_dict()[k], v), k
    x, t, ctx, hint = inputs(TINY)
    with torch.no_grad():  # zero convs: an untrained branch leaves the UNet unchanged
        res = ctrl(x, hint, t, ctx)
        assert all(r.abs().max() == 0 for r in res)
        assert max_abs(unet(x, t, ctx, control=res), unet(x, t, ctx)) == 0


@torch.no_grad()
@pytest.mark.parametrize("factor", [4, 2])
def test_the_trimap_branch_of_an_f4_or_f2_autoencoder_matches_diffusers(factor):
    """An f4 latent (LDM's VQ-f4, the paper's autoencoder family) needs a trimap embedder that
    shrinks the image 4 times, not 8: diffusers' ControlNetModel with two or one stride-2 stage
    (conditioning_embedding_out_channels), converted as users convert it, the factor read off
    the keys and off diffusers' config."""
    cfg = dataclasses.replace(TINY, hint_factor=factor)
    widths = (16, 32, 96, 256)[:int(math.log2(factor)) + 1]
    ref = randomize(diffusers.ControlNetModel(conditioning_channels=3,
                                              conditioning_embedding_out_channels=widths,
                                              **diffusers_kwargs(cfg)), 2).eval()
    sd = control_from_diffusers(ref.state_dict(), cfg)
    assert unet_config_from_state_dict(sd, cfg.num_heads, cfg.norm_num_groups).hint_factor == factor
    assert unet_config_from_diffusers(dict(ref.config), Path("controlnet")).hint_factor == factor
    assert set(control_to_diffusers(sd, cfg)) == set(ref.state_dict())
    ctrl = load_into(ControlNet(cfg), sd, "diffusers controlnet", "control branch").eval()
    x, t, ctx, _ = inputs(cfg)
    hint = torch.rand(2, 3, 16 * factor, 16 * factor, generator=torch.Generator().manual_seed(3))
    down, mid = ref(x, t, ctx, controlnet_cond=hint, return_dict=False)
    for i, (a, b) in enumerate(zip(ctrl(x, hint, t, ctx), list(down) + [mid])):
        assert b.abs().mean() > 1e-3, i
        assert max_abs(a, b) <= 1e-5, i


def test_sd15_layouts_map_every_key_both_ways():
    cfg = UNetConfig()
    with torch.device("meta"):
        pairs = [(diffusers.UNet2DConditionModel(cross_attention_dim=768), UNet(cfg),
                  unet_from_diffusers, unet_to_diffusers),
                 (diffusers.ControlNetModel(cross_attention_dim=768), ControlNet(cfg),
                  control_from_diffusers, control_to_diffusers)]
    for ref, ours, there, back in pairs:
        ref_sd, our_sd = ref.state_dict(), ours.state_dict()
        mapped = there(ref_sd, cfg)
        assert set(mapped) == set(our_sd)
        assert all(mapped[k].shape == our_sd[k].shape for k in our_sd)
        assert set(back(our_sd, cfg)) == set(ref_sd)
    assert sum(p.numel() for p in pairs[0][1].parameters()) == 859_520_964


def test_unet_with_control_exports():
    unet, ctrl = UNet(TINY).eval(), ControlNet(TINY).eval()
    x, t, ctx, hint = inputs(TINY, size=8, batch=1)
    res = [r + 0.1 for r in ctrl(x, hint, t, ctx)]
    prog = torch.export.export(unet, (x, t, ctx), {"control": res})
    with torch.no_grad():
        assert max_abs(prog.module()(x, t, ctx, control=res), unet(x, t, ctx, control=res)) <= 1e-6
    torch.export.export(ctrl, (x, hint, t, ctx))


@pytest.mark.slow
@torch.no_grad()
def test_sd15_size_unet_and_control_match_diffusers():
    """One step at SD 1.5 size (random weights), 32x32 latents: relative error <= 1e-4."""
    cfg = UNetConfig()
    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(cross_attention_dim=768).eval()
    unet = load_into(UNet(cfg), unet_from_diffusers(ref_unet.state_dict(), cfg), "sd15 unet", "UNet")
    ref_ctrl = randomize(diffusers.ControlNetModel(cross_attention_dim=768), 5, std=0.01).eval()
    ctrl = load_into(ControlNet(cfg), control_from_diffusers(ref_ctrl.state_dict(), cfg),
                     "sd15 controlnet", "control branch")
    x, t, ctx, hint = inputs(cfg, size=32, batch=1)
    down, mid = ref_ctrl(x, t, ctx, controlnet_cond=hint, return_dict=False)
    want = ref_unet(x, t, ctx, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample
    del ref_unet, ref_ctrl
    got = unet(x, t, ctx, control=ctrl(x, hint, t, ctx))
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-4, rel
