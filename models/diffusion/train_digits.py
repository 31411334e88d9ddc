r"""Train the shipped digits diffusion model (``models/diffusion/weights/digits_eps.npz``).

Run from the repository root::

    python -m models.diffusion.train_digits                  # writes the shipped weights
    python -m models.diffusion.train_digits --png digits.png # and a grid of samples

Objective (Ho et al. 2020, "Denoising diffusion probabilistic models"; the continuous-time VP form
of Song et al. 2021): with \(x_0\) a training image, \(s \sim U(10^{-3}, 1)\),
\(\varepsilon \sim \mathcal{N}(0, I)\) and \(x_s = \alpha_s x_0 + \sigma_s \varepsilon\), minimise
\(\lVert \varepsilon_\theta(x_s, s, c) - \varepsilon \rVert^2\), where the label \(c\) is replaced by the
null class with probability ``p_uncond`` = 0.15 (classifier-free guidance, Ho & Salimans 2022).
AdamW (optax) with linear warm-up and cosine decay, gradient clipping at norm 1, batch 256; the
saved weights are an exponential moving average (decay 0.999) of the iterates. Everything is
seeded (``--seed``, default 0): the data split is :func:`~models.diffusion.digits.digits_split`'s
default and all randomness comes from one JAX key, so a rerun on the same software reproduces the
weights up to floating-point reassociation across machines.

Measured wall time of the default run (12 000 steps, the shipped weights): 363 s on this project's
2-core CPU, shared with other jobs at the time (``train_seconds`` in the weights' record,
``load_digits_model().info``; final loss 4.05, summed over the 64 pixels).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from models.diffusion.digits import (
    DIGITS_WEIGHTS,
    NULL_CLASS,
    DigitsDiffusion,
    DigitsEpsNet,
    digits_split,
    save_digits_model,
)
from models.diffusion.vp_sde import VPSDE

__all__ = ["train_digits", "main"]


def _loss(net, sde, x0, labels, key, p_uncond, s_min):
    k_s, k_eps, k_drop = jax.random.split(key, 3)
    n = x0.shape[0]
    s = jax.random.uniform(k_s, (n,), minval=s_min, maxval=1.0)
    eps = jax.random.normal(k_eps, x0.shape)
    xs = sde.alpha(s)[:, None] * x0 + sde.sigma(s)[:, None] * eps
    drop = jax.random.bernoulli(k_drop, p_uncond, (n,))
    c = jnp.where(drop, NULL_CLASS, labels)
    pred = jax.vmap(net)(xs, s, c)
    return jnp.mean(jnp.sum((pred - eps) ** 2, axis=-1))


def train_digits(
    key: PRNGKeyArray,
    x_train: Float[Array, "n 64"],
    y_train: Int[Array, " n"],
    *,
    num_steps: int = 12_000,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    p_uncond: float = 0.15,
    ema_decay: float = 0.999,
    hidden: int = 256,
    num_blocks: int = 3,
    chunk: int = 200,
    sde: VPSDE | None = None,
    log=print,
) -> tuple[DigitsDiffusion, np.ndarray]:
    """Train from scratch; returns the EMA model and the mean loss of each chunk of steps."""
    sde = VPSDE() if sde is None else sde
    if num_steps % chunk:
        raise ValueError(f"num_steps ({num_steps}) must be a multiple of chunk ({chunk})")
    x_train = jnp.asarray(x_train, jnp.float32)
    y_train = jnp.asarray(y_train, jnp.int32)
    k_init, k_train = jax.random.split(key)
    net = DigitsEpsNet(k_init, hidden, num_blocks)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(500, num_steps // 10), num_steps, learning_rate * 0.02
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
    params, static = eqx.partition(net, eqx.is_array)
    opt_state = opt.init(params)
    ema = params

    def one_step(carry, key):
        params, ema, opt_state = carry
        k_batch, k_loss = jax.random.split(key)
        idx = jax.random.randint(k_batch, (batch_size,), 0, x_train.shape[0])

        def loss_fn(p):
            return _loss(eqx.combine(p, static), sde, x_train[idx], y_train[idx], k_loss,
                         p_uncond, 1e-3)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return (params, ema, opt_state), loss

    @jax.jit
    def run_chunk(carry, key):
        carry, losses = jax.lax.scan(one_step, carry, jax.random.split(key, chunk))
        return carry, jnp.mean(losses)

    carry = (params, ema, opt_state)
    chunk_losses = []
    t0 = time.perf_counter()
    for i, k in enumerate(jax.random.split(k_train, num_steps // chunk)):
        carry, loss = run_chunk(carry, k)
        chunk_losses.append(float(loss))
        if log is not None and ((i + 1) % 10 == 0 or i == 0):
            log(f"step {(i + 1) * chunk:6d}  loss {chunk_losses[-1]:.4f}  "
                f"{time.perf_counter() - t0:7.1f} s")
    ema_net = eqx.combine(carry[1], static)
    return DigitsDiffusion(ema_net, sde), np.asarray(chunk_losses)


def save_grid(path: str | Path, images: np.ndarray, ncols: int = 10) -> None:
    """Write ``images`` [n, 8, 8] (grey levels 0..16) as a PNG grid (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 0.8, nrows * 0.8))
    for ax, i in zip(np.ravel(axes), range(nrows * ncols)):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=16)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DIGITS_WEIGHTS)
    p.add_argument("--png", type=Path, default=None, help="also write a grid of DDIM samples")
    args = p.parse_args(argv)

    x_train, y_train, _, _ = digits_split()
    t0 = time.perf_counter()
    model, losses = train_digits(jax.random.key(args.seed), x_train, y_train, num_steps=args.steps)
    seconds = time.perf_counter() - t0
    info = {
        "train_steps": args.steps,
        "seed": args.seed,
        "train_seconds": round(seconds, 1),
        "final_loss": round(float(losses[-1]), 4),
        "p_uncond": 0.15,
        "batch_size": 256,
        "split": "digits_split(holdout_fraction=0.2, seed=0)",
        "jax": jax.__version__,
    }
    save_digits_model(args.out, model, info)
    print(f"trained {args.steps} steps in {seconds:.1f} s, final loss {losses[-1]:.4f}; "
          f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    if args.png is not None:
        from models.diffusion.digits import DDIM, sample_digits, to_pixels

        labels = jnp.repeat(jnp.arange(10), 10)
        x = sample_digits(jax.random.key(1), model, labels, DDIM(), num_steps=50)
        save_grid(args.png, np.asarray(to_pixels(x)))
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
