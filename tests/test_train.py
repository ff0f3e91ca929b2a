"""python -m minibldm.train on a tiny model and a tiny synthetic category: which parameters
train, that the loss goes down, bit-exact resume, refused setting changes, two gloo processes
against one, every stage from scratch, and bad input."""
import contextlib
import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import minibldm
from minibldm import weights
from minibldm.commands import losses, train, trainnets, trainsamples
from minibldm.autoencoder import Autoencoder
from minibldm.clip import TextEncoder
from minibldm.config import AutoencoderConfig, ModelConfig, TextConfig, UNetConfig
from minibldm.control import ControlNet
from minibldm.commands.data import PairDataset, load_or_make_split, read_category
from minibldm.ddim import alphas_cumprod
from minibldm.commands.synth import write_dataset
from minibldm.tokenizer import Tokenizer
from minibldm.unet import UNet

SIZE = 64
AE = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=8,
                       resolution=SIZE)
UNET = UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                  context_dim=32, norm_num_groups=8, num_res_blocks=1)
TEXT = TextConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2)
TINY = ModelConfig(AE, UNET, TEXT)
NETS = ("autoencoder", "unet", "text_encoder")


def run(*argv) -> tuple[int, str]:
    """train.main in this process; returns (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train.main([str(a) for a in argv])
    return rc, err.getvalue()


def tensors(path) -> dict:
    return load_file(str(path))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from a second thread, and on a shared 2-core machine
    OpenMP's waiting threads can make them many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pill(tmp_path_factory) -> Path:
    """A synthetic object category: 3 good images, 3 defect types of 3 images each, 64 px."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, per_class=3, size=SIZE, categories=["pill"], test_good=0,
                  test_per_defect=3, log=None)
    return root / "pill"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, pill) -> Path:
    """A random tiny weights folder (no control) with a tokenizer trained on the pill prompts."""
    out = tmp_path_factory.mktemp("weights")
    cat = read_category(pill)
    prompts = [f"a {cat.object_name} with a {n}" for n in cat.defect_names.values()]
    tok = Tokenizer.train(prompts + [f"a {cat.object_name}"], TEXT.vocab_size)
    torch.manual_seed(1)
    nets = {"autoencoder": Autoencoder(AE), "unet": UNet(UNET), "text_encoder": TextEncoder(TEXT)}
    weights.save(out, {"autoencoder": AE, "unet": UNET, "text": TEXT},
                 {k: v.state_dict() for k, v in nets.items()}, tok)
    return out


def control_args(pill, tiny_weights, out, steps, *extra):
    return ("--stage", "control", "--weights", tiny_weights, "--data", pill, "--out", out,
            "--steps", steps, "--batch-size", 2, "--lr", 1e-3, "--size", SIZE,
            "--checkpoint-every", 2, "--log-every", 1, *extra)


@pytest.fixture(scope="module")
def control_run(tmp_path_factory, pill, tiny_weights) -> tuple[Path, str]:
    """4 uninterrupted control steps (k = 10 > the 3 real defects per type)."""
    out = tmp_path_factory.mktemp("control") / "run"
    rc, err = run(*control_args(pill, tiny_weights, out, 4))
    assert rc == 0, err
    return out, err


# ---- the control stage ------------------------------------------------------------------------

def test_control_run_folder(control_run, tiny_weights):
    out, err = control_run
    assert "fewer than k=10" in err and "step 4/4" in err and "steps/s" in err
    for name in ("config.json", "split.json", "checkpoint.safetensors", "vocab.json", "merges.txt"):
        assert (out / name).is_file(), name
    rows = (out / "loss.csv").read_text().split()
    assert rows[0] == "step,loss" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert Image.open(out / "loss.png").size == (720, 400)
    raw = json.loads((out / "config.json").read_text())
    assert raw["image_size"] == SIZE and raw["train"]["stage"] == "control"
    assert raw["train"]["networks"]["control"] == "trained"
    with safe_open(str(out / "control.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["defects"]) == ["crack", "spot", "stain"] and meta["object"] == "pill"

    m = minibldm.load(out)  # the run folder is a complete weights folder
    assert m.control is not None and m.config == TINY
    m2 = minibldm.load(tiny_weights, control=out / "control.safetensors")  # as sample --control
    assert same(m.control.state_dict(), m2.control.state_dict())


def test_a_run_draws_what_it_makes_as_it_trains(control_run):
    """samples/step_N.png at the start and the end (4 steps < --preview-every 500): per training
    item a row of pair | trimap | sample; the networks' change shows in the sample column only
    (the pair and trimap are the same items). The run's weights equal a loop without previews
    (test_control_run_equals_a_plain_loop), so drawing does not disturb training."""
    out, err = control_run
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000000.png",
                                                                   "step_000004.png"]
    first, last = (np.asarray(Image.open(out / "samples" / n))
                   for n in ("step_000000.png", "step_000004.png"))
    assert first.shape == (4 * SIZE, 3 * SIZE, 3)
    assert (first[:, :2 * SIZE] == last[:, :2 * SIZE]).all()
    assert (first[:, 2 * SIZE:] != last[:, 2 * SIZE:]).any()
    assert "samples/" in err


def test_control_trains_only_the_branch(control_run, tiny_weights):
    out, _ = control_run
    for name in NETS:  # frozen networks: bit-identical to the input weights
        assert same(tensors(out / weights.FILES[name]), tensors(tiny_weights / weights.FILES[name]))
    before = ControlNet(UNET).copy_from_unet(minibldm.load(tiny_weights).unet).state_dict()
    after = tensors(out / "control.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    for prefix in ("input_hint_block.", "zero_convs.", "middle_block_out.", "input_blocks.",
                   "middle_block."):
        assert any(k.startswith(prefix) for k in moved), prefix
    assert after["middle_block_out.0.weight"].abs().sum() > 0  # zero conv has left zero
    ck = tensors(out / "checkpoint.safetensors")  # the optimizer held the branch's parameters only
    assert {k.split("/")[1] for k in ck if k.startswith("net/")} == {"control"}
    assert {k.split("/")[1] for k in ck if k.startswith("adamw/")} == \
        {f"control.{n}" for n, _ in ControlNet(UNET).named_parameters()}


def test_control_stage_freezes_the_rest(pill, tiny_weights, tmp_path):
    args = train.parse_args([str(a) for a in control_args(pill, tiny_weights, tmp_path, 1)])
    nets = trainnets.build_networks(args, *trainnets.model_config(args))
    assert args.lr == 1e-3 and train.parse_args(["--stage", "control", "--data", "x", "--out",
                                                 "y"]).lr == 1e-5  # the paper's default
    for name, net in nets.items():
        trained = name == "control"
        assert net.training == trained and all(p.requires_grad == trained for p in net.parameters())


def test_control_steps_lower_the_loss_on_a_fixed_batch(pill, tiny_weights, tmp_path):
    m = minibldm.load(tiny_weights)
    control = ControlNet(UNET).copy_from_unet(m.unet).train().requires_grad_(True)
    cat = read_category(pill)
    ds = PairDataset(cat, load_or_make_split(tmp_path / "split.json", cat, k=2), size=SIZE)
    batch = trainsamples.collate([ds[0], ds[1]])
    t, noise, post = trainsamples.sample_draws(0, [0, 1], (4, SIZE // 8, SIZE // 8))
    with torch.no_grad():
        z0 = losses.encode_latent(m.autoencoder, batch["image"], post)
        context = m.text_encoder(m.tokenizer(batch["prompt"]))
        empty = m.text_encoder(m.tokenizer(["", ""]))
    schedule = alphas_cumprod()
    opt = torch.optim.AdamW(control.parameters(), lr=1e-3)
    values = []
    for _ in range(12):
        loss = losses.denoising_loss(m.unet, z0, t, noise, context, schedule, control=control,
                                     hint=batch["hint"], control_context=empty)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    assert values[-1] < 0.92 * values[0] and values == sorted(values, reverse=True), values
    assert all(p.grad is None for p in m.unet.parameters())


def redo_control_steps(out, pill, tiny_weights, steps: int, cell_weights=None):
    """A control run's steps redone by hand from the spec: pairs 2s, 2s+1 for step s, z_0 a
    posterior sample, z_t = sqrt(ā_t) z_0 + sqrt(1 − ā_t) ε, the UNet reading τ(prompt) and the
    branch reading τ(""), AdamW on the branch alone. cell_weights(batch) -> (2, 1, h, w) makes
    the loss the weighted mean Σ w (ε_θ − ε)² / Σ w over all latent elements.
    Returns (the branch, the loss per step)."""
    m = minibldm.load(tiny_weights)
    control = trainnets.new_network("control", UNET, 0).copy_from_unet(m.unet)
    opt = torch.optim.AdamW(control.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)
    ds = PairDataset(read_category(pill), json.loads((out / "split.json").read_text()), size=SIZE)
    a = alphas_cumprod()
    with torch.no_grad():
        empty = m.text_encoder(m.tokenizer([""]))
    values = []
    for step in range(steps):
        idx = [2 * step, 2 * step + 1]
        batch = trainsamples.collate([ds[i] for i in idx])
        t, noise, post = trainsamples.sample_draws(0, idx, (4, SIZE // 8, SIZE // 8))
        with torch.no_grad():
            mean, logvar = m.autoencoder.moments(batch["image"])
            z0 = AE.scale_factor * (mean + torch.exp(0.5 * logvar) * post)
            context = torch.cat([m.text_encoder(m.tokenizer([p])) for p in batch["prompt"]])
        z_t = (a[t].sqrt().float()[:, None, None, None] * z0
               + (1 - a[t]).sqrt().float()[:, None, None, None] * noise)
        residuals = control(z_t, batch["hint"], t, empty.expand(2, -1, -1))
        eps = m.unet(z_t, t, context, control=residuals)
        if cell_weights is None:
            loss = ((eps - noise) ** 2).mean()
        else:
            w = cell_weights(batch)
            loss = (w * (eps - noise) ** 2).sum() / (w.sum() * eps.shape[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(loss.item())
    return control, values


def logged_losses(out) -> list[float]:
    return [float(r.split(",")[1]) for r in (out / "loss.csv").read_text().split()[1:]]


def test_control_run_equals_a_plain_loop(control_run, pill, tiny_weights):
    """The command's 4 steps, redone by hand (redo_control_steps)."""
    out, _ = control_run
    control, expected = redo_control_steps(out, pill, tiny_weights, 4)
    assert logged_losses(out) == pytest.approx(expected, rel=1e-6, abs=0)
    got = tensors(out / "control.safetensors")
    for k, v in control.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6, msg=k)


# ---- resume ---------------------------------------------------------------------------------

def test_resume_is_bit_exact(control_run, pill, tiny_weights, tmp_path):
    straight, _ = control_run
    out = tmp_path / "run"
    rc, err = run(*control_args(pill, tiny_weights, out, 2, "--grad-checkpoint"))
    assert rc == 0, err
    rc, err = run(*control_args(pill, tiny_weights, out, 4))  # trains on from step 2
    assert rc == 0, err
    assert "step 3/4" in err and "step 1/4" not in err
    assert same(tensors(out / "control.safetensors"), tensors(straight / "control.safetensors"))
    assert same(tensors(out / "checkpoint.safetensors"), tensors(straight / "checkpoint.safetensors"))
    assert (out / "loss.csv").read_text() == (straight / "loss.csv").read_text()
    assert not list(out.glob("*.tmp")), "a rerun leaves no temporary file (hard-linked networks)"

    rc, err = run(*control_args(pill, tiny_weights, out, 4, "--lr", 2e-3, "--seed", 1))
    assert rc == 2 and "lr" in err and "seed" in err and "steps" not in err, err
    assert same(tensors(out / "control.safetensors"), tensors(straight / "control.safetensors"))


KILL_AT = """
import os, sys, torch
from minibldm.commands import train
torch.set_num_threads(1)
add = train.Progress.add
def killed(self, done, value):  # kill -9 right after step {step}: no flush, no cleanup
    if done == {step}:
        os._exit(137)
    add(self, done, value)
train.Progress.add = killed
sys.exit(train.main(sys.argv[1:]))
"""


def test_a_kill_before_the_resumed_run_s_first_checkpoint_keeps_the_loss_history(
        pill, tiny_weights, tmp_path):
    """A run checkpoints at step 2; resumed to 6 (next checkpoint at 4), it is killed after step
    3: loss.csv still holds steps 1-2, and the rerun ends with the bytes of a straight run."""
    straight, out = tmp_path / "straight", tmp_path / "run"

    def args(o, steps):
        return [str(a) for a in control_args(pill, tiny_weights, o, steps)[:-4]] + [
            "--checkpoint-every", "4", "--log-every", "1"]
    assert run(*args(straight, 6))[0] == 0
    assert run(*args(out, 2)[:-2], "--checkpoint-every", "2")[0] == 0
    r = subprocess.run([sys.executable, "-c", KILL_AT.format(step=3), *args(out, 6)],
                       capture_output=True, text=True)
    assert r.returncode == 137, r.stderr[-2000:]
    rows = (out / "loss.csv").read_text().splitlines()
    assert rows[:3] == (straight / "loss.csv").read_text().splitlines()[:3], rows
    assert run(*args(out, 6))[0] == 0
    assert (out / "loss.csv").read_text() == (straight / "loss.csv").read_text()
    assert same(tensors(out / "control.safetensors"), tensors(straight / "control.safetensors"))
    assert not list(out.glob("*.tmp"))


# ---- several processes ------------------------------------------------------------------------

def test_two_gloo_processes_match_one(pill, tiny_weights, tmp_path):
    """The same global batch of 2 on one process and on two (one sample each) gives the same
    gradients up to the order of the reduction. lr is the paper's 1e-5: Adam divides by
    sqrt(v) + 1e-8, so where a gradient is near 1e-8 a last-bit difference moves a weight by up
    to about lr; the first moments compare the gradients themselves (a wrong share of the batch
    would change them by their own size)."""
    def args(out):
        return [str(a) for a in control_args(pill, tiny_weights, out, 2, "--lr", 1e-5)]
    rc, err = run(*args(tmp_path / "one"))
    assert rc == 0, err
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "minibldm.train", *args(tmp_path / "two"),
                        "--device", "cpu"], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "on 2 x cpu" in p.stderr
    one, two = tmp_path / "one", tmp_path / "two"
    a, b = tensors(one / "control.safetensors"), tensors(two / "control.safetensors")
    assert a.keys() == b.keys() and not same(a, b)  # two processes did run their own reduction
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    a, b = tensors(one / "checkpoint.safetensors"), tensors(two / "checkpoint.safetensors")
    for k in (k for k in a if k.endswith("/exp_avg")):  # measured: within 1e-4 of the largest
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-3 * a[k].abs().max().item(), msg=k)
    assert logged_losses(one) == pytest.approx(logged_losses(two), rel=1e-5)


# ---- the other stages, from nothing -----------------------------------------------------------

def test_every_stage_from_scratch(pill, control_run, tmp_path):
    tiny_control = control_run[0] / "control.safetensors"
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dataclasses.asdict(TINY)))
    common = ("--data", pill, "--steps", 2, "--batch-size", 2, "--size", SIZE, "--k", 2,
              "--checkpoint-every", 1)
    ae = tmp_path / "ae"
    rc, err = run("--stage", "autoencoder", "--config", cfg, "--out", ae, *common)
    assert rc == 0, err
    m = minibldm.load(ae)  # complete: new UNet and text encoder, tokenizer trained on the prompts
    assert m.config == TINY and m.tokenizer(["a pill with a crack"]).max() < TEXT.vocab_size
    fresh = trainnets.new_network("autoencoder", AE, 0).state_dict()
    assert not same(tensors(ae / "autoencoder.safetensors"), fresh)
    assert same(tensors(ae / "unet.safetensors"), trainnets.new_network("unet", UNET, 0).state_dict())

    text = tmp_path / "text"
    rc, err = run("--stage", "text", "--weights", ae, "--out", text, *common)
    assert rc == 0, err
    assert same(tensors(text / "autoencoder.safetensors"), tensors(ae / "autoencoder.safetensors"))
    for name in ("unet", "text_encoder"):
        assert not same(tensors(text / f"{name}.safetensors"), tensors(ae / f"{name}.safetensors"))

    shutil.copyfile(tiny_control, text / "control.safetensors")  # stale after a UNet change
    unet = tmp_path / "unet"
    rc, err = run("--stage", "unet", "--weights", text, "--out", unet, *common)
    assert rc == 0, err
    for name in ("autoencoder", "text_encoder"):
        assert same(tensors(unet / f"{name}.safetensors"), tensors(text / f"{name}.safetensors"))
    assert not same(tensors(unet / "unet.safetensors"), tensors(text / "unet.safetensors"))
    assert minibldm.load(unet).control is None


def test_vq_autoencoder_loss_trains_the_codebook():
    cfg = AutoencoderConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_num_groups=8,
                            double_z=False, n_embed=32, embed_dim=4, z_channels=4, scale_factor=1.0)
    loss_fn = losses.AutoencoderLoss(Autoencoder(cfg), "l1", 1e-6, 1.0)
    loss = loss_fn(torch.rand(2, 3, 16, 16) * 2 - 1, None)
    loss.backward()
    assert torch.isfinite(loss) and loss_fn.autoencoder.quantize.embedding.weight.grad.abs().sum() > 0


# ---- bad input --------------------------------------------------------------------------------

def broken_copy(pill, tmp_path, how):
    root = tmp_path / "pill"
    shutil.copytree(pill, root)
    if how == "no good images":
        for f in (root / "train" / "good").iterdir():
            f.unlink()
    elif how == "defect without a mask":
        (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    elif how == "mask size":
        Image.new("L", (SIZE + 4, SIZE), 255).save(root / "ground_truth" / "crack" / "001_mask.png")
    return root


@pytest.mark.parametrize("how, extra, message", [
    ("no good images", (), "no good images"),
    ("defect without a mask", (), "without a mask"),
    ("mask size", (), "mask is"),
    (None, ("--defect", "dent"), "no defect type 'dent'"),
    (None, ("--lr", 1e30), "non-finite loss"),
])
def test_bad_input_exits_2(pill, tiny_weights, tmp_path, how, extra, message):
    data = broken_copy(pill, tmp_path, how) if how else pill
    rc, err = run(*control_args(data, tiny_weights, tmp_path / "run", 4, *extra))
    assert rc == 2 and message in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("python -m minibldm.train: error:"), err
    if message == "non-finite loss":
        assert "at step" in line and "checkpoint" in line


def test_control_stage_needs_frozen_networks(pill, tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dataclasses.asdict(TINY)))
    rc, err = run("--stage", "control", "--config", cfg, "--data", pill, "--out", tmp_path / "r",
                  "--size", SIZE)
    assert rc == 2 and "frozen autoencoder" in err, err


# ---- building a model from nothing: presets, the latent scale, one branch for several categories

def test_config_accepts_a_preset_name(pill, tmp_path):
    out = tmp_path / "ae"
    rc, err = run("--stage", "autoencoder", "--config", "tiny", "--data", pill, "--out", out,
                  "--steps", 1, "--batch-size", 1, "--size", SIZE)
    assert rc == 0, err
    raw = json.loads((out / "config.json").read_text())
    assert raw["train"]["config"] == "tiny"
    assert minibldm.load(out).config == minibldm.config.TINY


def test_scale_factor_auto_gives_unit_variance_latents(pill, tiny_weights, tmp_path):
    out = tmp_path / "text"
    common = ("--stage", "text", "--weights", tiny_weights, "--data", pill, "--out", out,
              "--batch-size", 2, "--size", SIZE, "--k", 2, "--scale-factor", "auto")
    rc, err = run(*common, "--steps", 1)
    assert rc == 0, err
    scale = json.loads((out / "config.json").read_text())["autoencoder"]["scale_factor"]
    assert scale != AE.scale_factor and f"latent scale factor {scale:.6g} (auto)" in err
    assert minibldm.load(out).config.autoencoder.scale_factor == scale

    # the property: the run's first 64 training latents, scaled, have standard deviation 1
    args = train.parse_args([str(a) for a in common] + ["--steps", "1"])
    cats, splits = trainsamples.read_data(args, out)
    dataset = trainsamples.make_dataset(args, cats, splits)
    ae = minibldm.load(out).autoencoder
    shape = (AE.embed_dim, SIZE // 8, SIZE // 8)
    with torch.no_grad():
        z = torch.cat([losses.encode_latent(ae, dataset[i]["image"][None],
                                            trainsamples.sample_draws(0, [i], shape)[2]) for i in range(64)])
    assert abs(z.std().item() - 1) < 1e-4

    rc, err = run(*common, "--steps", 2)  # resumes: the same rule gives the same scale
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["autoencoder"]["scale_factor"] == scale
    rc, err = run(*common[:-1], "0.5", "--steps", 3)
    assert rc == 2 and "scale_factor" in err, err


def test_defect_repeat_only_for_domain_stages(pill, tiny_weights, tmp_path):
    rc, err = run(*control_args(pill, tiny_weights, tmp_path / "run", 2, "--defect-repeat", "3"))
    assert rc == 2 and "--defect-repeat: only the text, unet and autoencoder stages" in err, err
    rc, err = run("--stage", "unet", "--weights", tiny_weights, "--data", pill, "--out",
                  tmp_path / "u", "--steps", "1", "--defect-repeat", "0")
    assert rc == 2 and "--defect-repeat must be at least 1" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "u").exists()


@pytest.mark.parametrize("value, message", [("-1", "positive number"), ("x", "positive number")])
def test_scale_factor_bad_values(pill, tiny_weights, tmp_path, value, message):
    rc, err = run("--stage", "unet", "--weights", tiny_weights, "--data", pill, "--out",
                  tmp_path / "r", "--size", SIZE, "--scale-factor", value)
    assert rc == 2 and message in err and not (tmp_path / "r").exists(), err
    rc, err = run(*control_args(pill, tiny_weights, tmp_path / "c", 1, "--scale-factor", "auto"))
    assert rc == 2 and "only the text and unet stages" in err, err


def test_control_branch_for_several_categories(pill, tiny_weights, tmp_path):
    write_dataset(tmp_path / "more", per_class=3, size=SIZE, categories=["washer"], test_good=0,
                  test_per_defect=3, log=None)
    washer = tmp_path / "more" / "washer"
    out = tmp_path / "run"
    args = control_args(pill, tiny_weights, out, 2)
    rc, err = run(*args[:5], pill, washer, *args[6:])
    assert rc == 0, err
    assert (out / "split-0-pill.json").is_file() and (out / "split-1-washer.json").is_file()
    with safe_open(str(out / "control.safetensors"), "pt") as f:
        meta = f.metadata()
    objects = json.loads(meta["objects"])
    washer_name = read_category(washer).object_name  # from meta.json: "metal washer"
    assert objects == {"pill": {"crack": "crack", "spot": "black specks", "stain": "stain"},
                       washer_name: read_category(washer).defect_names}
    assert json.loads(meta["defects"]) == sorted(set(objects["pill"]) | set(objects[washer_name]))

    # samples alternate between the categories
    parsed = train.parse_args([str(a) for a in (*args[:5], pill, washer, *args[6:])])
    cats, splits = trainsamples.read_data(parsed, out)
    dataset = trainsamples.make_dataset(parsed, cats, splits)
    prompts = [dataset[i]["prompt"] for i in range(8)]
    assert all(p.startswith("a pill ") for p in prompts[0::2] if p)
    assert all(p.startswith(f"a {washer_name} ") for p in prompts[1::2] if p)


# ---- --defect-weight: the denoising loss weighted towards the defect's latent cells -----------

def test_defect_weighted_control_run_equals_a_plain_loop(pill, tiny_weights, tmp_path):
    """2 control steps with --defect-weight 5, redone by hand: a latent cell weighs 5 when any
    pixel of its 8 x 8 patch is in the pasted defect's mask, else 1."""
    out = tmp_path / "run"
    rc, err = run(*control_args(pill, tiny_weights, out, 2, "--defect-weight", 5))
    assert rc == 0, err
    h, heavy = SIZE // 8, []

    def cell_weights(batch):
        w = torch.ones(2, 1, h, h)
        for b in range(2):
            for i in range(h):
                for j in range(h):
                    if batch["mask"][b, 0, 8 * i:8 * i + 8, 8 * j:8 * j + 8].any():
                        w[b, 0, i, j] = 5
        heavy.append(int((w == 5).sum()))
        return w
    _, expected = redo_control_steps(out, pill, tiny_weights, 2, cell_weights)
    assert all(0 < n < 2 * h * h for n in heavy), heavy  # the weights single out some cells
    logged = logged_losses(out)
    assert logged == pytest.approx(expected, rel=1e-5, abs=0)
    plain = tmp_path / "plain"  # and the weighting changed the loss
    rc, err = run(*control_args(pill, tiny_weights, plain, 1))
    assert rc == 0, err
    assert abs(logged_losses(plain)[0] - logged[0]) > 1e-4 * logged[0]


def test_defect_weight_in_the_domain_stage_and_bad_values(pill, tiny_weights, tmp_path):
    common = ("--weights", tiny_weights, "--data", pill, "--size", SIZE, "--batch-size", 4,
              "--k", 2, "--defect-repeat", 3)
    rc, err = run("--stage", "unet", *common, "--out", tmp_path / "u", "--steps", 1,
                  "--defect-weight", 10)
    assert rc == 0, err
    cfg = json.loads((tmp_path / "u" / "config.json").read_text())
    assert cfg["train"]["defect_weight"] == 10
    for value in ("0", "-2", "nan"):
        rc, err = run("--stage", "unet", *common, "--out", tmp_path / "bad",
                      "--defect-weight", value)
        assert rc == 2 and "--defect-weight must be positive" in err, err
    assert not (tmp_path / "bad").exists()


def test_defect_weighted_autoencoder_step_equals_a_plain_loop(pill, tiny_weights, tmp_path):
    """One autoencoder step with --defect-weight 5, redone by hand: L1 over the pixels with the
    defect's pixels weighing 5, divided by the sum of the weights, plus ldm's KL term."""
    argv = ["--stage", "autoencoder", "--weights", tiny_weights, "--data", pill, "--out",
            tmp_path / "ae", "--size", SIZE, "--batch-size", 4, "--k", 2, "--defect-repeat", 3,
            "--steps", 1, "--log-every", 1, "--defect-weight", 5]
    rc, err = run(*argv)
    assert rc == 0, err
    args = train.parse_args([str(a) for a in argv])
    cats, splits = trainsamples.read_data(args, tmp_path / "ae")
    ds = trainsamples.make_dataset(args, cats, splits)
    batch = trainsamples.collate([ds[i] for i in range(4)])
    assert 0 < batch["mask"].sum() < batch["mask"].numel()  # a defect among them
    _, _, post = trainsamples.sample_draws(0, list(range(4)), (4, SIZE // 8, SIZE // 8))
    ae = minibldm.load(tiny_weights).autoencoder
    with torch.no_grad():
        mean, logvar = ae.moments(batch["image"])
        rec = ae.decoder(ae.post_quant_conv(mean + torch.exp(0.5 * logvar) * post))
        w = 1 + 4 * batch["mask"]
        l1 = (w * (rec - batch["image"]).abs()).sum() / (3 * w.sum())
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + 1e-6 * kl / (3 * SIZE * SIZE)
    assert logged_losses(tmp_path / "ae") == pytest.approx([loss.item()], rel=1e-5, abs=0)
    unweighted = ((rec - batch["image"]).abs().mean() + 1e-6 * kl / (3 * SIZE * SIZE)).item()
    assert abs(unweighted - loss.item()) > 1e-3 * loss.item()  # the weights do change it


def test_a_checkpoint_from_before_defect_weight_resumes(pill, tiny_weights, tmp_path):
    """Runs checkpointed before --defect-weight existed were made with weight 1 and resume."""
    out = tmp_path / "run"
    rc, err = run(*control_args(pill, tiny_weights, out, 2))
    assert rc == 0, err
    ckpt = out / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as f:
        meta = f.metadata()
    state = json.loads(meta["state"])
    del state["run"]["defect_weight"]
    from safetensors.torch import save_file
    save_file(load_file(str(ckpt)), str(ckpt), {**meta, "state": json.dumps(state)})
    rc, err = run(*control_args(pill, tiny_weights, out, 3))
    assert rc == 0 and "steps 2..3" in err, err
    rc, err = run(*control_args(pill, tiny_weights, out, 4, "--defect-weight", 2))
    assert rc == 2 and "defect_weight" in err, err
