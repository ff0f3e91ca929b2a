"""AdaBLDM outside torch: the exported networks in onnxruntime, everything else in NumPy. It
checks each network against the porting vectors, then replays the vectors' whole sample
(Algorithm 1 with the recorded random draws) and compares z_OK, z* and decode(z*).

    python -m minibldm.export --onnx onnx/tiny
    python tools/replay_numpy.py onnx/tiny tests/vectors/tiny.safetensors

This is docs/PORTING.md in code: what a port must do, and nothing else. It imports neither
torch nor minibldm. onnxruntime only runs graphs forward, so Algorithm 2 (the decoder
adaptation, which needs gradients) is not replayed: the script stops at z* and decode(z*).
Exit status 0 when every entry is within the tolerance the vectors state, 1 otherwise.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from safetensors import safe_open

F32 = np.float32
NETWORKS = ("text_encoder", "control", "unet", "encoder", "decoder")


class Net:
    """One ONNX graph: called with its inputs by name, returns its outputs by name."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, **feeds):
        return dict(zip(self.outputs, self.session.run(None, feeds)))


def schedule(n=1000, start=0.00085, end=0.012):
    """ā_t for t = 0..n-1 in float64: ldm's "linear" betas are squares of evenly spaced roots."""
    return np.cumprod(1 - np.linspace(start ** 0.5, end ** 0.5, n) ** 2)


def timesteps(steps, n=1000):
    """t_0 > ... > t_{N-1}: ldm's 1 + k * (n // N), descending (981, 961, ..., 1 for N = 50),
    its last N entries when N does not divide n."""
    return [int(t) for t in (np.arange(0, n, n // steps) + 1)[::-1][-steps:]]


def q_sample(x0, t, noise, ac):
    """x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) noise; coefficients in float64, cast last."""
    return F32(np.sqrt(ac[t])) * x0 + F32(np.sqrt(1 - ac[t])) * noise


def ddim_step(z, eps, t, t_prev, ac):
    """DDIM with eta 0 -> (z_prev, x0). After t = 1 (t_prev = -1) ā_prev is ā[0], not 1."""
    a, a_prev = ac[t], ac[max(t_prev, 0)]
    x0 = (z - F32(np.sqrt(1 - a)) * eps) / F32(np.sqrt(a))
    return F32(np.sqrt(a_prev)) * x0 + F32(np.sqrt(1 - a_prev)) * eps, x0


def keep_mask(mask, f):
    """1 where the latent keeps z_OK's: 1 - dilate_5x5(nearest-resize(M*)); nearest reads the
    pixel (f i, f j) of latent cell (i, j)."""
    small = mask[:, :, ::f, ::f]
    h, w = small.shape[-2:]
    p = np.pad(small, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return 1 - np.max([p[:, :, i:i + h, j:j + w] for i in range(5) for j in range(5)], axis=0)


class Model:
    """The five graphs of `python -m minibldm.export --onnx DIR` and the constants around them."""

    def __init__(self, onnx_dir):
        d = Path(onnx_dir)
        self.nets = {name: Net(d / f"{name}.onnx") for name in NETWORKS}
        ae = json.loads((d / "config.json").read_text())["autoencoder"]
        self.scale, self.f = ae["scale_factor"], 2 ** (len(ae["ch_mult"]) - 1)
        self.ac = schedule()

    def encode(self, x, noise):
        """A posterior sample of x, scaled: scale * (mean + exp(logvar / 2) * noise)."""
        m = self.nets["encoder"](image=x)
        return F32(self.scale) * (m["mean"] + np.exp(0.5 * m["logvar"]) * noise)

    def decode(self, z):
        return self.nets["decoder"](z=z)["image"]

    def eps(self, z, t, cond, uncond, hint, guidance):
        """Classifier-free guidance on the text only: the trimap branch reads τ("") and its
        residuals go to both halves of the batch."""
        tt = np.array([t], np.int64)
        res = self.nets["control"](z_t=z, hint=hint, t=tt, context=uncond)
        e = self.nets["unet"](z_t=np.concatenate([z, z]), t=np.concatenate([tt, tt]),
                              context=np.concatenate([cond, uncond]),
                              **{k: np.concatenate([r, r]) for k, r in res.items()})["eps"]
        e_cond, e_uncond = e[:1], e[1:]
        return e_uncond + F32(guidance) * (e_cond - e_uncond)

    def sample(self, x_ok, mask, hint, ids, draws, s):
        """Algorithm 1 for one image -> (z_OK, z*). draws: every standard normal draw, in order."""
        draws = iter(draws)
        cond, uncond = np.split(self.nets["text_encoder"](ids=ids)["hidden"], 2)
        z_ok = self.encode(x_ok, next(draws))
        keep = keep_mask(mask, self.f)
        st = s["stages"]
        ts = timesteps(st["steps"])
        z = next(draws)  # z_T
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            if st["latent_start"] <= i < st["latent_stop"]:  # latent editing, before the step
                z = keep * q_sample(z_ok, t, next(draws), self.ac) + (1 - keep) * z
            z, x0 = ddim_step(z, self.eps(z, t, cond, uncond, hint, s["guidance"]), t, t_prev, self.ac)
            if i >= st["image_start"]:  # image editing, after: the posterior draw, then q_sample's
                blended = self.decode(x0) * mask + x_ok * (1 - mask)
                z = q_sample(self.encode(blended, next(draws)), t, next(draws), self.ac)
        return z_ok, z


def difference(new, ref):
    """Max abs difference over max(1, the reference's largest magnitude): the vectors' measure."""
    ref = ref.astype(np.float64)
    return float(np.abs(new - ref).max() / max(1.0, float(np.abs(ref).max())))


def check_components(model, v):
    """Each network, and the DDIM step, from the vectors' own inputs -> {entry: difference}."""
    n = model.nets
    res = {k[len("control.out."):]: v[k] for k in v if k.startswith("control.out.")}
    zeros = {k: np.zeros_like(r) for k, r in res.items()}
    z_t, t = v["control.in.z_t"], v["control.in.t"]
    got = {"text_encoder.out.hidden": n["text_encoder"](ids=v["tokenizer.out.ids"])["hidden"],
           "unet.out.eps": n["unet"](z_t=z_t, t=t, context=v["unet.in.context"], **res)["eps"],
           "unet.out.eps_no_control": n["unet"](z_t=z_t, t=t, context=v["unet.in.context"],
                                                **zeros)["eps"],
           "decoder.out.image": n["decoder"](z=v["decoder.in.z"])["image"],
           "ddim.in.alphas_cumprod": model.ac}
    got.update({f"control.out.{k}": r for k, r in n["control"](
        z_t=z_t, hint=v["control.in.hint"], t=t, context=v["control.in.context"]).items()})
    got.update({f"encoder.out.{k}": r for k, r in n["encoder"](image=v["encoder.in.image"]).items()})
    t_now, t_prev = (int(x) for x in v["ddim.in.t"])
    got["ddim.out.z_prev"], got["ddim.out.x0"] = ddim_step(v["ddim.in.z_t"], v["ddim.in.eps"],
                                                           t_now, t_prev, model.ac)
    return {k: difference(x, v[k]) for k, x in got.items()}


def replay(model, v, settings):
    """The whole sample -> {entry: difference} for z_OK, z* and decode(z*)."""
    z_ok, z = model.sample(v["sample.in.x_ok"], v["sample.in.mask"], v["sample.in.hint"],
                           v["sample.in.ids"], v["sample.in.noise"], settings)
    got = {"sample.out.z_ok": z_ok, "sample.out.z": z, "sample.out.before": model.decode(z)}
    return {k: difference(x, v[k]) for k, x in got.items()}


def main(argv):
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    with safe_open(argv[1], "np") as f:
        v, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tol, settings = json.loads(meta["tolerance"]), json.loads(meta["sample"])
    t0 = time.perf_counter()
    model = Model(argv[0])
    t1 = time.perf_counter()
    diffs = check_components(model, v)
    t2 = time.perf_counter()
    diffs.update(replay(model, v, settings))
    t3 = time.perf_counter()
    bad = 0
    for k, d in sorted(diffs.items()):
        limit = tol[k.split(".")[0]]
        bad += d > limit
        print(f"{'FAIL' if d > limit else 'ok  '} {k:34s} {d:.3g} (tolerance {limit:g})")
    print(f"load {t1 - t0:.1f} s, components {t2 - t1:.1f} s, whole sample {t3 - t2:.1f} s")
    print(f"decoder adaptation ({settings['adapt_steps']} AdamW steps, Algorithm 2) not replayed: "
          "onnxruntime runs graphs forward only; a port that can train continues from z* "
          "(docs/PORTING.md)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
