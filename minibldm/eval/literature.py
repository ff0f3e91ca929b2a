"""The literature's generation metrics for `python -m minibldm.genquality`: IS and KID
(torch-fidelity) and IC-LPIPS (lpips), from the optional `eval` extra.

They are kept apart because they may not run here (a package missing, backbone weights that
cannot be fetched): such a metric is recorded as {"skipped": reason} instead of failing the
command. `ic_lpips` takes the distance as an argument, so it is tested without lpips.
"""
from __future__ import annotations

import importlib
import itertools
import warnings

import numpy as np
import torch

from ..cli import UsageError
from ..images import DataError
from ..io import first_line


def ic_lpips(generated: list, centres: list, distance, cap: int = 50) -> dict:
    """Intra-cluster LPIPS (Ojha et al. 2021), with distance(xs, ys) -> one float per pair
    (xs[i], ys[i]): each generated item joins the cluster of its nearest centre (a tie goes to
    the first); a cluster scores the mean distance over all pairs of its first `cap` members;
    the score is the mean over clusters with a pair (None when none has one).
    Returns {"score", "clusters": [{"members", "used", "score"}] in the order of centres}."""
    n, k = len(generated), len(centres)
    d = np.asarray(distance([g for g in generated for _ in centres],
                            [c for _ in generated for c in centres]), np.float64).reshape(n, k)
    nearest = d.argmin(axis=1)  # a tie goes to the first centre
    clusters = []
    for c in range(k):
        members = np.flatnonzero(nearest == c).tolist()
        pairs = list(itertools.combinations(members[:cap], 2))
        score = float(np.mean(distance([generated[i] for i, _ in pairs],
                                       [generated[j] for _, j in pairs]))) if pairs else None
        clusters.append({"members": len(members), "used": min(len(members), cap), "score": score})
    scores = [c["score"] for c in clusters if c["score"] is not None]
    return {"score": float(np.mean(scores)) if scores else None, "clusters": clusters}


class Skip(Exception):
    """A metric that cannot be computed here; the message says why."""


def optional(name: str):
    """The module `name` of the `eval` extra, or Skip saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"{name} is not installed ({type(e).__name__}); pip install -e \".[eval]\"")


def is_kid(tf, gen: torch.Tensor, real: torch.Tensor, device: str) -> tuple[dict, dict]:
    """(IS of gen, KID of gen against real) with torch-fidelity `tf`; uint8 (N, 3, H, W)."""
    if min(len(gen), len(real)) < 2:
        raise Skip(f"needs 2 images a set (has {len(gen)} generated, {len(real)} real)")
    subset = min(1000, len(gen), len(real))
    # torch-fidelity reads a Dataset: each image of the stack as an item
    gen_set, real_set = (torch.utils.data.Subset(x, range(len(x))) for x in (gen, real))
    m = tf.calculate_metrics(input1=gen_set, input2=real_set, isc=True, kid=True,
                             isc_splits=min(10, max(1, len(gen) // 10)), kid_subset_size=subset,
                             cuda=device.startswith("cuda"), cache=False, save_cpu_ram=True,
                             verbose=False)
    return ({"mean": m["inception_score_mean"], "std": m["inception_score_std"]},
            {"mean": m["kernel_inception_distance_mean"], "std": m["kernel_inception_distance_std"],
             "subset_size": subset, "n_real": len(real)})


def lpips_distance(device: str, batch: int = 16):
    """distance(xs, ys) for ic_lpips: LPIPS (AlexNet, v0.1) of uint8 (3, H, W) image pairs."""
    net = optional("lpips").LPIPS(net="alex", version="0.1", verbose=False).to(device).eval()

    @torch.no_grad()
    def distance(xs, ys):
        out = []
        for i in range(0, len(xs), batch):
            a, b = (torch.stack(v[i:i + batch]).to(device).float() / 127.5 - 1 for v in (xs, ys))
            out += net(a, b).flatten().tolist()
        return out
    return distance


def literature(types: list[str], read, cap: int, device: str, log, prog: str) -> dict:
    """{type: {"is", "kid", "ic_lpips"}}; read(type) -> (generated, real, train) uint8 stacks.
    A metric that cannot run is {"skipped": reason}, logged once with the command's name; one
    that cannot score a type (too few images) is skipped for that type alone."""
    out = {t: {} for t in types}

    def score_types(keys: tuple, tool) -> None:
        for t, (gen, real, train) in {t: read(t) for t in types}.items():
            log(f"{'/'.join(keys)}: {t}")
            try:
                got = is_kid(tool, gen, real, device) if keys[0] == "is" else \
                    (ic_lpips(list(gen), list(train), tool, cap),)
            except Skip as e:
                log(f"{prog}: skipped {'/'.join(keys)} for {t}: {e}")
                got = ({"skipped": str(e)},) * len(keys)
            out[t].update(zip(keys, got))

    for keys, setup in ((("is", "kid"), lambda: optional("torch_fidelity")),
                        (("ic_lpips",), lambda: lpips_distance(device))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score_types(keys, setup())
        except (UsageError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - no package, no network, no weights, ...
            reason = str(e) if isinstance(e, Skip) else f"{first_line(e)} (weights are read " \
                f"from {torch.hub.get_dir()}/checkpoints)"
            log(f"{prog}: skipped {'/'.join(keys)}: {reason}")
            for t in types:  # the types scored before the failure keep their values
                out[t].update({k: {"skipped": reason} for k in keys if k not in out[t]})
    return out
