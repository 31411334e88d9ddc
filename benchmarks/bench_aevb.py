"""AEVB on scikit-learn's digits: a VAE trained with the ELBO against one trained with IWAE(K).

Data: ``load_digits`` (1797 images, 8 x 8, grey levels 0..16 scaled to [0, 1]), a random 80/20
split; training images binarised dynamically (x ~ Bernoulli(intensity) at every use), the held-out
set binarised once (Salakhutdinov & Murray 2008; Burda et al. 2016). Model: z ∈ R^L ~ N(0, I),
Bernoulli decoder (MLP, tanh, 2 hidden layers), diagonal-Gaussian encoder (same shape), output bias
initialised at the logits of the pixel frequencies. Both models see the same number of likelihood
evaluations per step: IWAE(K) on B images, the ELBO on K·B images (one sample each). Adam.
Reported: the held-out log-likelihood log p(x) in nats per image, estimated by IWAE with
``--eval-k`` particles (Burda et al. use 5000), ± its standard error over the test images, the
Monte Carlo error given the images, and each model's held-out ELBO (K = 1) for reference.

    python benchmarks/bench_aevb.py                       # defaults below (about 4 minutes on 2 CPU cores)
    python benchmarks/bench_aevb.py --steps 500 --eval-k 200 --png ''   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from samplers import variational as vi  # noqa: E402
from samplers.variational import aevb  # noqa: E402


def build(key, latent, width, depth, data_mean):
    k1, k2 = jax.random.split(key)
    return aevb.VAE(aevb.GaussianEncoder.init(k1, 64, latent, width=width, depth=depth),
                    aevb.BernoulliDecoder.init(k2, latent, 64, width=width, depth=depth,
                                               data_mean=data_mean))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30000)
    p.add_argument("--batch", type=int, default=64, help="images per IWAE step (ELBO: K times more)")
    p.add_argument("--k", type=int, default=5, help="IWAE particles in training")
    p.add_argument("--latent", type=int, default=8)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-k", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "aevb_digits.png"))
    args = p.parse_args(argv)

    t_all = time.perf_counter()
    key = jax.random.key(args.seed)
    k_data, k_init, k_train, k_eval = jax.random.split(key, 4)
    train_x, test_x = aevb.load_digits_split(k_data, 0.2)
    print(f"digits: {train_x.shape[0]} training, {test_x.shape[0]} held-out images; "
          f"L={args.latent}, MLP {args.depth}x{args.width} tanh, Adam {args.lr}, {args.steps} steps")
    vae0 = build(k_init, args.latent, args.width, args.depth, train_x.mean(0))
    runs = {
        "ELBO (VAE)": (vi.ELBO(), args.batch * args.k),
        f"IWAE (K={args.k})": (vi.IWAE(args.k), args.batch),
    }
    rows, models = [], {}
    for name, (objective, batch) in runs.items():
        t = time.perf_counter()
        res = aevb.train(k_train, vae0, train_x, objective, optax.adam(args.lr), args.steps,
                         batch_size=batch, binarise=True, chunk_size=250)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        held = aevb.heldout_log_likelihood(k_eval, res.params, test_x, args.eval_k)
        t_eval = time.perf_counter() - t
        elbo = aevb.heldout_log_likelihood(k_eval, res.params, test_x, 1)
        models[name] = res.params
        rows.append((name, batch, held, elbo.mean, float(-np.mean(np.asarray(res.losses)[-200:])),
                     t_train, t_eval, res.nan_stopped))
    print(f"\nheld-out log-likelihood, nats per image (IWAE estimate with K={args.eval_k}; "
          f"{test_x.shape[0]} test images)\n")
    print("| trained with | images/step | log p(x) held out | ± s.e. (images) | MC error | "
          "held-out ELBO | train bound (last 200 steps) | train s | eval s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, batch, held, elbo, tb, t_train, t_eval, stopped in rows:
        flag = " (NaN stop)" if stopped else ""
        print(f"| {name}{flag} | {batch} | {held.mean:.2f} | {held.sem:.2f} | {held.mc_error:.3f} | "
              f"{elbo:.2f} | {tb:.2f} | {t_train:.0f} | {t_eval:.0f} |")
    (n1, _, h1, *_), (n2, _, h2, *_) = rows
    d = np.asarray(h2.log_likelihood, np.float64) - np.asarray(h1.log_likelihood, np.float64)
    print(f"\npaired difference {n2} − {n1}: {d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(d.size):.3f}"
          f" nats per image")
    print(f"total time {time.perf_counter() - t_all:.0f} s")

    if args.png:
        try:
            from matplotlib.figure import Figure
        except ImportError:  # pragma: no cover
            print("matplotlib not available: no PNG")
            return rows
        fig = Figure(figsize=(10, 4.2), constrained_layout=True)
        axes = fig.subplots(len(models) + 1, 1)
        show = np.asarray(test_x[:12])
        panels = [("held-out (binarised)", show)]
        for name, m in models.items():
            rec = np.asarray(m.reconstruct(test_x[:12]))
            smp = np.asarray(m.sample(jax.random.key(1), 12))
            panels.append((f"{name}: reconstructions | samples (pixel probabilities)",
                           np.concatenate([rec, smp])))
        for ax, (title, imgs) in zip(axes, panels):
            strip = np.concatenate([im.reshape(8, 8) for im in imgs], axis=1)
            ax.imshow(strip, cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
        fig.savefig(args.png, dpi=110)
        print(f"wrote {args.png}")
    return rows


if __name__ == "__main__":
    main()
