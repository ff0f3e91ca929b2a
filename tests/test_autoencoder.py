"""Autoencoder parity with diffusers AutoencoderKL / VQModel (tiny configs, random weights), the
diffusers key mapping at full size (meta device), and the VQ / KL training helpers."""
import dataclasses

import pytest
import torch
from conftest import max_abs

from types import SimpleNamespace

from minibldm import fast
from minibldm.autoencoder import Autoencoder, kl_loss
from minibldm.fast.conv import GridUpsample
from minibldm.config import SD15, VQ_F4, VQ_F8, AutoencoderConfig
from minibldm.convert import autoencoder_from_diffusers, autoencoder_to_diffusers
from minibldm.io import load_into

diffusers = pytest.importorskip("diffusers")

# f=4, and levels 1 and 2 have equal widths, so a wrong decoder level order keeps every shape
# and only the numbers can catch it. embed_dim != z_channels for VQ catches mixing the two up.
TINY_KL = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, resolution=32,
                            z_channels=4, embed_dim=4, double_z=True, scale_factor=0.5,
                            norm_num_groups=8)
TINY_VQ = AutoencoderConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=32,
                            z_channels=4, embed_dim=3, double_z=False, n_embed=64,
                            scale_factor=0.7, norm_num_groups=8)
# attention at the deepest level (32 / 4 = 8), as VQ-f8's attn_resolutions=(32,) at 256
TINY_VQ_ATTN = dataclasses.replace(TINY_VQ, attn_resolutions=(8,))


def diffusers_kwargs(cfg: AutoencoderConfig) -> dict:
    """Constructor arguments of the diffusers model with the same architecture as `cfg`."""
    attn = [cfg.resolution // 2 ** i in cfg.attn_resolutions for i in range(len(cfg.ch_mult))]
    kw = dict(in_channels=cfg.in_channels, out_channels=cfg.out_ch,
              down_block_types=[("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D")
                                for a in attn],
              up_block_types=[("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D")
                              for a in reversed(attn)],
              block_out_channels=[cfg.ch * m for m in cfg.ch_mult],
              layers_per_block=cfg.num_res_blocks, latent_channels=cfg.z_channels,
              norm_num_groups=cfg.norm_num_groups, sample_size=cfg.resolution,
              scaling_factor=cfg.scale_factor)
    if cfg.is_vq:
        kw.update(num_vq_embeddings=cfg.n_embed, vq_embed_dim=cfg.embed_dim)
    return kw


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move GroupNorm weights and all biases off their ones/zeros init, which would hide swapped
    norms. Conv weights keep their (random) init: larger ones make the net amplify rounding."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def ours_from(theirs: torch.nn.Module, cfg: AutoencoderConfig) -> Autoencoder:
    sd = theirs.state_dict()
    ours = load_into(Autoencoder(cfg), autoencoder_from_diffusers(sd), "test", "autoencoder")
    back = autoencoder_to_diffusers(ours.state_dict())
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    return ours.eval()


@torch.no_grad()
def test_kl_matches_diffusers():
    theirs = perturbed(diffusers.AutoencoderKL(**diffusers_kwargs(TINY_KL)))
    ours = ours_from(theirs, TINY_KL)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    post = theirs.encode(x).latent_dist  # diffusers leaves scaling_factor to the pipeline
    mean, logvar = ours.moments(x)
    assert max_abs(mean, post.mean) <= 1e-5 and max_abs(logvar, post.logvar) <= 1e-5
    assert max_abs(ours.encode(x), 0.5 * post.mean) <= 1e-5
    sample = ours.encode(x, generator=torch.Generator().manual_seed(3))
    ref = 0.5 * post.sample(generator=torch.Generator().manual_seed(3))
    assert max_abs(sample, ref) <= 1e-5 and max_abs(sample, 0.5 * post.mean) > 1e-2
    z = torch.randn(2, 4, 8, 8)
    assert max_abs(ours.decode(z), theirs.decode(z / 0.5).sample) <= 1e-5


@torch.no_grad()
def test_upsampling_route_matches_diffusers():
    """fast.optimize's upsampling route (the convolution computed on the input grid), forced
    onto every one of the tiny model's upsampling levels, still matches diffusers."""
    theirs = perturbed(diffusers.AutoencoderKL(**diffusers_kwargs(TINY_KL)))
    ours = ours_from(theirs, TINY_KL)
    keys = set(ours.state_dict())
    fast.optimize(SimpleNamespace(unet=torch.nn.Module(), control=None, autoencoder=ours),
                  upsample_min_channels=1)
    routed = [m for m in ours.modules() if isinstance(m, GridUpsample)]
    assert len(routed) == len(TINY_KL.ch_mult) - 1  # every upsampling level takes the route
    assert set(ours.state_dict()) == keys
    z = torch.randn(2, 4, 8, 8)
    assert max_abs(ours.decode(z), theirs.decode(z / 0.5).sample) <= 1e-5


def test_old_diffusers_attention_names():
    sd = diffusers.AutoencoderKL(**diffusers_kwargs(TINY_KL)).state_dict()
    old = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
           .replace(".to_out.0.", ".proj_attn."): v for k, v in sd.items()}
    assert old.keys() != sd.keys()
    new, got = autoencoder_from_diffusers(sd), autoencoder_from_diffusers(old)
    assert new.keys() == got.keys() and all(torch.equal(new[k], got[k]) for k in new)


@pytest.mark.parametrize("cfg", [TINY_VQ, TINY_VQ_ATTN], ids=["plain", "attn_deepest"])
@torch.no_grad()
def test_vq_matches_diffusers(cfg):
    theirs = perturbed(diffusers.VQModel(**diffusers_kwargs(cfg)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = theirs.encode(x).latents  # (2, 3, 8, 8), before quantisation
    # codebook = 64 of the 128 latent vectors, nudged, so that quantising picks many codes
    flat = h.permute(0, 2, 3, 1).reshape(-1, 3)
    codes = flat[torch.randperm(len(flat))[:64]]
    theirs.quantize.embedding.weight.copy_(codes + 0.1 * codes.std() * torch.randn_like(codes))
    ours = ours_from(theirs, cfg)
    assert max_abs(ours.encode(x), cfg.scale_factor * h) <= 1e-5
    z_q, _, idx = ours.quantize(h)
    assert idx.unique().numel() > 10
    assert max_abs(z_q, h) > 1e-2  # so quantising (or not) shows in the decoded image
    image = ours.decode(cfg.scale_factor * h)
    assert max_abs(image, theirs.decode(h).sample) <= 1e-5
    assert max_abs(image, theirs.decode(h, force_not_quantize=True).sample) > 1e-3


# Full-size configs as in the public diffusers folders (vae/config.json of SD 1.5, the vqvae of
# CompVis/ldm-super-resolution-4x-openimages), and VQ-f8 with attention at its deepest level.
FULL_SIZE = {
    "sd15": (SD15.autoencoder, diffusers.AutoencoderKL, dict(
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
        sample_size=512)),
    "vq_f4": (VQ_F4, diffusers.VQModel, dict(
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[128, 256, 512], layers_per_block=2, latent_channels=3,
        num_vq_embeddings=8192, sample_size=256)),
    "vq_f8": (VQ_F8, diffusers.VQModel, dict(
        down_block_types=["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        block_out_channels=[128, 256, 256, 512], layers_per_block=2, latent_channels=4,
        num_vq_embeddings=16384, sample_size=256)),
}


@pytest.mark.parametrize("name", list(FULL_SIZE))
def test_full_size_key_mapping(name):
    cfg, cls, kwargs = FULL_SIZE[name]
    with torch.device("meta"):
        ours = Autoencoder(cfg).state_dict()
        theirs = cls(**kwargs).state_dict()
    for got, want in ((autoencoder_to_diffusers(ours), theirs),
                      (autoencoder_from_diffusers(theirs), ours)):
        assert sorted(got) == sorted(want)
        assert all(got[k].shape == want[k].shape for k in want), \
            [k for k in want if got[k].shape != want[k].shape]
    assert ("encoder.down.3.attn.1.proj_out.weight" in ours) == (name == "vq_f8")


def test_names_are_the_compvis_checkpoint_keys():
    """diffusers' own reader of CompVis SD checkpoints accepts our names (an independent table)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    cfg, _, kwargs = FULL_SIZE["sd15"]
    with torch.device("meta"):
        ours = Autoencoder(cfg).state_dict()
    ref = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ours.items()}, kwargs)
    got = autoencoder_to_diffusers(ours)
    assert sorted(got) == sorted(ref) and all(got[k].shape == ref[k].shape for k in ref)


def test_straight_through_estimator():
    ae = Autoencoder(TINY_VQ)
    h = ae.quant_conv(ae.encoder(torch.randn(2, 3, 16, 16)))
    h.retain_grad()
    z_q, _, idx = ae.quantize(h)
    z_q.retain_grad()
    ae.decoder(ae.post_quant_conv(z_q)).square().mean().backward()
    codebook = ae.quantize.embedding.weight
    assert max_abs(z_q, codebook[idx].permute(0, 3, 1, 2)) < 1e-6  # z + (e - z): rounding only
    assert torch.equal(h.grad, z_q.grad) and h.grad.abs().sum() > 0  # identity backward
    assert ae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert codebook.grad is None  # the reconstruction loss does not move the codebook


def test_vq_loss_and_gradients():
    ae = Autoencoder(TINY_VQ)
    beta = TINY_VQ.beta
    codebook = ae.quantize.embedding.weight
    with torch.no_grad():
        codebook.normal_()
    h = torch.randn(2, 3, 5, 6, requires_grad=True)
    _, loss, idx = ae.quantize(h)
    # independent: nearest code by cdist, loss and gradients written out by hand
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, 3)                      # (60, 3)
    ref_idx = torch.cdist(flat, codebook.detach()).argmin(1)
    assert torch.equal(idx.flatten(), ref_idx)
    e = codebook.detach()[ref_idx]
    mse = (e - flat).pow(2).mean()
    assert abs(loss.item() - (1 + beta) * mse.item()) < 1e-6
    loss.backward()
    n = flat.numel()
    h_grad = 2 * (flat - e) / n                     # commitment term, weight 1 (ldm legacy)
    assert max_abs(h.grad.permute(0, 2, 3, 1).reshape(-1, 3), h_grad) < 1e-7
    code_grad = torch.zeros_like(codebook).index_add_(0, ref_idx, beta * 2 * (e - flat) / n)
    assert max_abs(codebook.grad, code_grad) < 1e-7  # codebook term, weight beta


def test_kl_helpers():
    mean, logvar = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, (0.5 * logvar).exp()),
        torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean)))
    assert max_abs(kl_loss(mean, logvar), ref.sum(dim=(1, 2, 3))) < 1e-5
    ae = Autoencoder(TINY_KL)
    with torch.no_grad():
        ae.quant_conv.bias[4:] = 100.0  # the logvar half
    assert torch.all(ae.moments(torch.randn(1, 3, 8, 8))[1] == 20.0)  # clamped as ldm


def test_config_checks_and_separable_decoder():
    with pytest.raises(ValueError, match="double_z"):
        Autoencoder(AutoencoderConfig(n_embed=16, double_z=True))
    with pytest.raises(ValueError, match="KL"):
        Autoencoder(TINY_VQ).moments(torch.randn(1, 3, 8, 8))
    ae = Autoencoder(TINY_KL).eval()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(ae.decode(z), ae.decoder(ae.post_quant_conv(z / 0.5)))


def test_resnet_block_recompute_keeps_less_for_backward_and_changes_nothing():
    """fast.adapt.RecomputedResnetBlock (the decoder adaptation's memory saver for big images):
    the GroupNorm outputs are computed again in the backward pass instead of kept, so autograd
    holds fewer bytes at the end of the forward pass; output and gradients are bit-identical to
    the reference ResnetBlock with the same parameters."""
    from minibldm.autoencoder import ResnetBlock
    from minibldm.fast.adapt import RecomputedResnetBlock
    torch.manual_seed(0)
    block = ResnetBlock(16, 32, 8)
    recomputed = RecomputedResnetBlock(block)
    assert set(recomputed.state_dict()) == set(block.state_dict())
    x0 = torch.randn(2, 16, 24, 24)

    def run(module):
        module.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = module(x)
        kept = sum(saved)  # bytes kept for backward (hooks see what each op saves)
        y.square().sum().backward()
        return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()], kept
    y0, gx0, gp0, kept0 = run(block)
    y1, gx1, gp1, kept1 = run(recomputed)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gp0, gp1))
    act = 2 * 24 * 24 * 4  # bytes of one channel of activations for the batch
    assert kept0 - kept1 >= (16 + 32) * act * 0.99, (kept0, kept1)  # both norm outputs not kept
