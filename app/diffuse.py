r"""``ppl diffuse``: digits from the shipped diffusion model, steered to a class, written as a PNG grid.

    ppl diffuse --class 3 --method fk --particles 8 --images 16 --out threes.png

Methods (each returns one image per run; ``--images`` runs):

- ``fk``: FK steering (Singhal et al. 2025) of the *unconditional* model towards
  \(p(x)\, p_A(c \mid x)^\lambda\), with the verifier \(p_A\) (a logistic regression fitted on half A
  of ``load_digits``), ``--particles`` particles, the ``--potential`` (DIFF, MAX, SUM, RT) and
  resampling every ``--resample-every`` steps; the returned image is the final particle with the
  highest verifier reward.
- ``best-of-n``: ``--particles`` independent chains of the same unconditional model, the one with
  the highest verifier reward: the same network evaluations (NFE) as ``fk``.
- ``conditional``: one chain of the class-conditional model (label = the class), no search.

The images are judged by the *independent evaluator* (an MLP fitted on the other half, B, of the
data): the printed accuracy is the fraction it recognises as the class. A progress bar counts the
runs (the first one includes compilation).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

METHODS = ("fk", "best-of-n", "conditional")
POTENTIAL_NAMES = ("diff", "max", "sum", "rt")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="digit", type=int, required=True, help="the target digit, 0..9")
    p.add_argument("--method", choices=METHODS, default="fk",
                   help="fk: FK steering of the unconditional model by the verifier; best-of-n: the "
                        "same number of independent chains, best verifier reward; conditional: the "
                        "class-conditional model (default fk)")
    p.add_argument("--particles", type=int, default=8,
                   help="FK particles = best-of-n chains per image (default 8)")
    p.add_argument("--images", type=int, default=16, help="images in the grid (default 16)")
    p.add_argument("--steps", type=int, default=30, help="reverse Euler-Maruyama steps (default 30)")
    p.add_argument("--potential", choices=POTENTIAL_NAMES, default="diff",
                   help="FK potential on the verifier reward of Tweedie's x0-hat (default diff)")
    p.add_argument("--lam", type=float, default=5.0,
                   help="lambda of the tilt p(x) p_A(c|x)^lambda (default 5)")
    p.add_argument("--resample-every", type=int, default=5, help="resample every k steps (default 5)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--out", default=None, help="PNG path (default digits_<class>_<method>.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args) -> None:
    if not 0 <= args.digit <= 9:
        raise ValueError(f"--class must be a digit 0..9, got {args.digit}")
    for name in ("particles", "images", "steps", "resample_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.lam >= 0:
        raise ValueError(f"--lam must be >= 0, got {args.lam}")


def _sampler(args, model, verifier):
    """A compiled ``run(key) -> (image [64], nfe)`` for the chosen method."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    from models.diffusion import (
        RT,
        ClassLogProb,
        Diff,
        EulerMaruyama,
        Max,
        Sum,
        best_of_n_chains,
        best_sample,
        digits_fk_steering,
        resampling_window,
        sample_digits,
        steering_diagnostics,
        steps_before_resampling,
    )
    from samplers.smc import smc

    n, k = args.particles, args.steps
    reward = ClassLogProb(verifier, jnp.asarray(args.digit, jnp.int32))
    if args.method == "conditional":
        labels = jnp.full((1,), args.digit, jnp.int32)

        def run(key):
            x = sample_digits(key, model, labels, EulerMaruyama(), num_steps=k)
            return x[0], k + 1

        return run

    potential = {"diff": Diff(), "max": Max(), "sum": Sum(), "rt": RT()}[args.potential]
    T = k + 1
    every = min(args.resample_every, T)
    schedule = resampling_window(T, every)
    steps = steps_before_resampling(schedule)
    fk = digits_fk_steering(model, reward, args.lam, potential, num_steps=k, potential_steps=steps)

    if args.method == "fk":
        @eqx.filter_jit
        def one(key, fk):
            res = smc(key, fk, n, ess_threshold=0.0, resample_schedule=schedule)
            x, _ = best_sample(res.particles)
            return x, steering_diagnostics(res).nfe
    else:
        @eqx.filter_jit
        def one(key, fk):
            b = best_of_n_chains(key, fk, n)
            return b.sample, b.nfe

    def run(key):
        x, nfe = one(key, fk)
        return x, int(jax.device_get(nfe))

    return run


def save_grid(images, path: str | Path, title: str | None = None, ncols: int = 8) -> Path:
    """Write model-space digits ``images`` [n, 64] as a grid of 8 x 8 grey images to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    from models.diffusion import to_pixels

    px = np.asarray(to_pixels(np.asarray(images)))
    n = px.shape[0]
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.1 * ncols, 1.1 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(px[i], cmap="gray_r", vmin=0, vmax=16)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_diffuse(args: argparse.Namespace, out=None) -> int:
    _check(args)
    out = sys.stdout if out is None else out
    import jax
    import numpy as np
    from tqdm import tqdm

    from models.diffusion import fit_digits_classifier, fit_digits_evaluator, load_digits_model

    model = load_digits_model()
    verifier = fit_digits_classifier("A")
    evaluator = fit_digits_evaluator()
    run = _sampler(args, model, verifier)
    keys = jax.random.split(jax.random.key(args.seed), args.images)
    images, nfes = [], []
    t0 = time.perf_counter()
    bar = tqdm(keys, desc=f"diffuse {args.method} class {args.digit}", unit="img",
               disable=args.no_progress, dynamic_ncols=True, leave=False)
    for key in bar:
        x, nfe = run(key)
        images.append(np.asarray(x))
        nfes.append(nfe)
    bar.close()
    seconds = time.perf_counter() - t0
    images = np.stack(images)
    if not np.all(np.isfinite(images)):
        raise FloatingPointError(f"{int((~np.isfinite(images)).any(1).sum())} images are not finite")
    verdict = np.asarray(evaluator.predict(images))
    verifier_lp = np.asarray(verifier.log_probs(images))[:, args.digit]
    accuracy = float(np.mean(verdict == args.digit))
    path = Path(args.out or f"digits_{args.digit}_{args.method}.png")
    how = args.method if args.method == "conditional" else f"{args.method}, N={args.particles}"
    save_grid(images, path, title=f"class {args.digit} ({how}): evaluator accuracy {accuracy:.2f}")
    print(f"wrote {path}: {args.images} images of class {args.digit} by {how}, {args.steps} steps", file=out)
    print(f"evaluator accuracy {accuracy:.3f} (independent MLP, half B); verifier mean log p "
          f"{float(verifier_lp.mean()):.3f} (logistic regression, half A)", file=out)
    print(f"NFE per image {nfes[0]}; {seconds:.1f} s for {args.images} images "
          f"(first includes compilation)", file=out)
    return 0
