"""`python -m minibldm.convert` end to end: public layouts in, a minibldm weights folder out, loaded
with `minibldm.load` and checked against the diffusers / transformers models it came from; and
the one-line errors (exit status 2, nothing written) for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLIP_VOCAB, max_abs, randomize

import minibldm
from minibldm import convert
from minibldm.config import SD15, VQ_F4, UNetConfig
from minibldm.convert import (autoencoder_config_from_state_dict, text_config_from_state_dict,
                              unet_config_from_state_dict)
from minibldm.control import ControlNet
from minibldm.autoencoder import Autoencoder
from minibldm.unet import UNet

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not CLIP_VOCAB.is_file(), reason="needs ../shared/clip vocabulary")

TOOL = Path(__file__).resolve().parents[1] / "tools" / "convert_weights.py"
# 32 GroupNorm groups, as in every public checkpoint (shapes cannot tell the group count).
UCFG = UNetConfig(model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,), num_heads=2,
                  context_dim=128, num_res_blocks=1)


def run_tool(*args):
    return subprocess.run([sys.executable, "-m", "minibldm.convert", *map(str, args)],
                          capture_output=True, text=True)


def test_the_tools_path_is_the_same_command(tmp_path):
    r = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "python -m minibldm.convert" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "missing.ckpt"), tmp_path / "o"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing.ckpt" in r.stderr


@pytest.fixture(scope="module")
def reference():
    """Tiny diffusers / transformers models with random weights (CLIP with the real vocab size)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
        cross_attention_dim=128, attention_head_dim=2)
    ctrl = diffusers.ControlNetModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        layers_per_block=1, cross_attention_dim=128, attention_head_dim=2)
    # f = 8 like SD's, so that the ControlNet's trimap embedder (which shrinks by 8) fits it
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                                  down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.5)
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu"))
    return {k: randomize(m, i).eval() for i, (k, m) in
            enumerate(dict(unet=unet, control=ctrl, vae=vae, clip=clip).items())}


def compvis_state_dict(ref) -> dict:
    """The tiny models in the CompVis / ControlNet layout, with the extra keys real ones carry."""
    sd = {}
    parts = {"model.diffusion_model.": convert.unet_from_diffusers(ref["unet"].state_dict(), UCFG),
             "control_model.": convert.control_from_diffusers(ref["control"].state_dict(), UCFG),
             "first_stage_model.": convert.autoencoder_from_diffusers(ref["vae"].state_dict()),
             "cond_stage_model.transformer.": ref["clip"].state_dict()}
    for prefix, part in parts.items():
        sd.update({prefix + k: v.clone() for k, v in part.items()})
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000)
    sd["scale_factor"] = torch.tensor(0.5)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return sd


@torch.no_grad()
def check_against_reference(models, ref):
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    ctx = torch.randn(1, 77, 128, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    down, mid = ref["control"](x, t, ctx, controlnet_cond=hint, return_dict=False)
    want = ref["unet"](x, t, ctx, down_block_additional_residuals=down,
                       mid_block_additional_residual=mid).sample
    got = models.unet(x, t, ctx, control=models.control(x, hint, t, ctx))
    assert max_abs(got, want) <= 1e-5
    z = torch.randn(1, 4, 8, 8, generator=g)
    assert max_abs(models.autoencoder.decode(z * 0.5), ref["vae"].decode(z).sample) <= 1e-5
    ids = models.tokenizer(["a magnetic tile with a crack"])
    assert ids.shape == (1, 77)
    assert max_abs(models.text_encoder(ids), ref["clip"](ids).last_hidden_state) <= 1e-5


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_compvis_checkpoint_converts_and_loads(tmp_path, reference, suffix):
    sd = compvis_state_dict(reference)
    src = tmp_path / f"model{suffix}"
    if suffix == ".ckpt":
        torch.save({"state_dict": sd, "global_step": 10}, src)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(src))
    # shapes cannot tell the head count: the tiny UNet has 2, not SD's 8
    r = run_tool(src, tmp_path / "out", "--vocab", CLIP_VOCAB, "--num-heads", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["autoencoder"]["scale_factor"] == 0.5  # read from the checkpoint's buffer
    models = minibldm.load(tmp_path / "out")
    assert models.control is not None
    check_against_reference(models, reference)


def test_diffusers_folders_convert_and_load(tmp_path, reference):
    pipe = tmp_path / "pipe"
    reference["unet"].save_pretrained(pipe / "unet")
    reference["vae"].save_pretrained(pipe / "vae")
    reference["clip"].save_pretrained(pipe / "text_encoder")
    reference["control"].save_pretrained(tmp_path / "controlnet")
    # the hub's SD 1.5 folder holds tokenizer/vocab.json + merges.txt
    minibldm.tokenizer.Tokenizer.from_file(CLIP_VOCAB).save(pipe / "tokenizer")
    r = run_tool(pipe, tmp_path / "out", "--control", tmp_path / "controlnet")
    assert r.returncode == 0, r.stderr
    models = minibldm.load(tmp_path / "out")
    assert models.config.unet.num_heads == 2  # from the diffusers config, not the SD default
    check_against_reference(models, reference)


def test_configs_read_off_shapes():
    cases = [(UNet, UNetConfig(), unet_config_from_state_dict),
             (ControlNet, UCFG, unet_config_from_state_dict),
             (Autoencoder, SD15.autoencoder, autoencoder_config_from_state_dict),
             (Autoencoder, VQ_F4, autoencoder_config_from_state_dict)]
    for cls, cfg, read in cases:
        with torch.device("meta"):
            sd = cls(cfg).state_dict()
        got = read(sd, num_heads=cfg.num_heads) if cls in (UNet, ControlNet) else read(sd)
        assert got == cfg, cls
    from minibldm.clip import TextEncoder
    with torch.device("meta"):
        assert text_config_from_state_dict(TextEncoder(SD15.text).state_dict()) == SD15.text


def test_ldm_vq_autoencoder_checkpoint(tmp_path):
    with torch.device("meta"):
        keys = Autoencoder(VQ_F4).state_dict()
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in keys.items()}
    sd["loss.discriminator.main.0.weight"] = torch.zeros(1)  # LDM checkpoints keep their losses
    torch.save({"state_dict": sd}, tmp_path / "vq.ckpt")
    r = run_tool(tmp_path / "vq.ckpt", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["autoencoder"]["n_embed"] == 8192 and cfg["autoencoder"]["scale_factor"] == 1.0
    assert not (tmp_path / "out" / "unet.safetensors").exists()


# --- bad input: one line on stderr naming the file, exit status 2, nothing written -------------

@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory, reference):
    path = tmp_path_factory.mktemp("good") / "model.ckpt"
    sd = compvis_state_dict(reference)
    torch.save(sd, path)
    return path, sd


def broken(sd, how):
    sd = dict(sd)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    if how == "missing":
        del sd[key]
    elif how == "extra":
        sd["model.diffusion_model.input_blocks.1.0.extra.weight"] = torch.zeros(1)
    elif how == "shape":
        sd[key] = torch.zeros(3, 3)
    return sd


@pytest.mark.parametrize("how,needle", [
    ("missing", "1 missing: input_blocks.1.0.in_layers.2.weight"),
    ("extra", "1 unexpected: input_blocks.1.0.extra.weight"),
    ("shape", "input_blocks.1.0.in_layers.2.weight has shape (3, 3) in the file"),
    ("truncated", "cannot be read"),
    ("pickle", "cannot be read as a weights-only checkpoint"),
    ("nontensor", "entries that are not tensors: model.diffusion_model.note"),
    ("nonexistent", "no such file"),
])
def test_bad_checkpoints_fail_cleanly(tmp_path, good_ckpt, how, needle):
    path, sd = good_ckpt
    src = tmp_path / "bad.ckpt"
    if how in ("missing", "extra", "shape"):
        torch.save(broken(sd, how), src)
    elif how == "truncated":
        data = path.read_bytes()
        src.write_bytes(data[: len(data) // 2])
    elif how == "pickle":
        import functools  # a callable: what a malicious pickle would smuggle in
        torch.save({"state_dict": sd, "hook": functools.partial(print, "hi")}, src)
    elif how == "nontensor":
        torch.save({"state_dict": {**sd, "model.diffusion_model.note": "text"}}, src)
    out = tmp_path / "out"
    r = run_tool(src, out, "--vocab", CLIP_VOCAB)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and needle in lines[0], r.stderr
    assert not out.exists()


def test_heads_that_do_not_divide_the_unet_are_refused(tmp_path, good_ckpt):
    """--num-heads 3 on a UNet of widths 32 / 64 would write a folder that cannot load."""
    path, _ = good_ckpt
    r = run_tool(path, tmp_path / "out", "--vocab", CLIP_VOCAB, "--num-heads", "3")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--num-heads 3: does not divide" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_fails_cleanly(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(100)}, str(tmp_path / "x.safetensors"))
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-50])
    r = run_tool(tmp_path / "x.safetensors", tmp_path / "out")
    assert r.returncode == 2 and "not a readable safetensors file" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_load_reports_missing_folder_and_files(tmp_path):
    with pytest.raises(minibldm.io.WeightsError, match="no such weights folder"):
        minibldm.load(tmp_path / "nope")
    (tmp_path / "w").mkdir()
    with pytest.raises(minibldm.io.WeightsError, match="config.json: no such file"):
        minibldm.load(tmp_path / "w")


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files and safetensors recreates its file; the result must be readable
    like any other file the user writes (0666 minus the umask)."""
    import os
    import stat

    from minibldm.io import save_atomic, write_text_atomic
    umask = os.umask(0)
    os.umask(umask)
    save_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    write_text_atomic(tmp_path / "c.json", "{}")
    for f in ("w.safetensors", "c.json"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o666 & ~umask, f
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "w.safetensors"]
