"""Variational inference against numpyro SVI and blackjax mean-field VI, in one run.

Same model, same guide, same optimiser, same number of ELBO draws per step:

- the model: a zoo entry (``models/zoo``) seen on its flat unconstrained space
  (``ppl.numpyro_model.from_numpyro``; numpyro's own ``AutoNormal`` uses the same bijections);
- the guide: a mean-field Gaussian on that space, started at \\(\\mu = 0\\), \\(\\sigma = 0.1\\);
- the optimiser: ``optax.adam(--lr)``; ``--draws`` reparameterised draws per ELBO estimate;
- the methods:
  ``ours``  ``samplers.variational.fit`` (``ELBO(M)``, estimator ``--estimator``, default
  sticking-the-landing), one compiled ``lax.scan`` over the steps;
  ``numpyro``  ``SVI(model, AutoNormal, optax_to_numpyro(adam), Trace_ELBO(M))``, its
  ``update`` in one jitted ``lax.scan`` (the fastest way to drive it; ``svi.run`` adds a Python
  loop or a progress bar);
  ``blackjax``  ``blackjax.meanfield_vi(log_joint, adam, M)`` (its default STL estimator), its
  ``step`` in one jitted ``lax.scan``.

Reported per method: compile time (first call minus a steady call), steady-state time per step
(median of ``--reps`` calls of the whole scan, divided by the steps), and the final ELBO, each
guide converted to the same flat mean-field Gaussian and evaluated by one estimator with
``--eval-draws`` common draws (its Monte Carlo standard error beside it), plus the posterior-mean
error against the zoo's reference (RMS over coordinates, in reference posterior sds, on the
constrained sites).

    python benchmarks/bench_variational.py                       # logistic regression, eight schools
    python benchmarks/bench_variational.py --models eight_schools --steps 500 --reps 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import blackjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpyro  # noqa: E402
import optax  # noqa: E402
from numpyro.infer import SVI, Trace_ELBO  # noqa: E402
from numpyro.infer.autoguide import AutoNormal  # noqa: E402
from numpyro.infer.initialization import init_to_value  # noqa: E402
from numpyro.optim import optax_to_numpyro  # noqa: E402

from models.zoo import get as zoo_get  # noqa: E402
from samplers import variational as vi  # noqa: E402


def _timed(fn, reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    steady = float(np.median(times))
    return out, max(first - steady, 0.0), steady


def _posterior_error(entry, target, guide, key, n=4000):
    """RMS over the compared coordinates of (mean_q − ref_mean) / ref_sd."""
    ref = entry.reference()
    theta = target.constrain(guide.sample(key, n))
    errs = []
    for site in entry.sites:
        if site not in theta or site not in ref.mean:
            continue
        m = np.asarray(theta[site], np.float64).reshape(n, -1).mean(0)
        errs.append((m - np.ravel(ref.mean[site])) / np.ravel(ref.sd[site]))
    e = np.concatenate(errs)
    return float(np.sqrt(np.mean(e**2)))


def run_model(name, args):
    entry = zoo_get(name)
    target = entry.target()
    d = target.dim
    steps, m, lr = args.steps, args.draws, args.lr
    key = jax.random.key(args.seed)
    init_scale = 0.1
    rows = {}

    # ---- ours -------------------------------------------------------------------------------
    guide0 = vi.MeanFieldGaussian.init(d, scale=init_scale)
    obj = vi.ELBO(m)
    adam = optax.adam(lr)  # one instance: the compiled scan is cached on the optimiser's identity

    def ours():
        return vi.fit(key, guide0, obj, target, adam, steps, chunk_size=steps,
                      estimator=args.estimator, progress=False).params

    ours_guide, c, s = _timed(ours, args.reps)
    rows["ours"] = dict(guide=ours_guide, compile_s=c, step_s=s / steps)

    # ---- numpyro SVI --------------------------------------------------------------------------
    init_values = {k: v for k, v in target.constrain(jnp.zeros(d)).items()
                   if k in target.latent_sites}
    guide = AutoNormal(entry.model, init_loc_fn=init_to_value(values=init_values),
                       init_scale=init_scale)
    svi = SVI(entry.model, guide, optax_to_numpyro(optax.adam(lr)), Trace_ELBO(num_particles=m))
    model_args = entry.args()
    svi_state0 = svi.init(key, *model_args)

    @jax.jit
    def numpyro_run(state):
        def body(st, _):
            st, loss = svi.update(st, *model_args)
            return st, loss
        return jax.lax.scan(body, state, None, length=steps)[0]

    st, c, s = _timed(lambda: numpyro_run(svi_state0), args.reps)
    params = svi.get_params(st)
    loc = target.ravel({n: params[f"{n}_auto_loc"] for n in target.latent_sites})
    scale = target.ravel({n: params[f"{n}_auto_scale"] for n in target.latent_sites})
    rows["numpyro"] = dict(guide=vi.MeanFieldGaussian(loc, jnp.log(scale)), compile_s=c,
                           step_s=s / steps)

    # ---- blackjax mean-field VI ---------------------------------------------------------------
    mfvi = blackjax.meanfield_vi(target.log_joint, optax.adam(lr), m)
    bj0 = mfvi.init(jnp.zeros(d))
    bj0 = bj0._replace(rho=jnp.full((d,), math.log(init_scale), jnp.float32))

    @jax.jit
    def blackjax_run(state):
        def body(st, k):
            st, info = mfvi.step(k, st)
            return st, info.elbo
        return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

    st, c, s = _timed(lambda: blackjax_run(bj0), args.reps)
    rows["blackjax"] = dict(guide=vi.MeanFieldGaussian(st.mu, st.rho), compile_s=c,
                            step_s=s / steps)

    # ---- common evaluation --------------------------------------------------------------------
    k_eval = jax.random.key(args.seed + 1)
    elbo_draws = jax.jit(lambda g: jax.vmap(lambda k: vi.elbo(k, g, target))(
        jax.random.split(k_eval, args.eval_draws)))
    out = {}
    for method, r in rows.items():
        vals = np.asarray(elbo_draws(r["guide"]), np.float64)
        out[method] = dict(
            compile_s=r["compile_s"], step_ms=1e3 * r["step_s"],
            elbo=float(vals.mean()), elbo_se=float(vals.std(ddof=1) / math.sqrt(vals.size)),
            mean_error_sd=_posterior_error(entry, target, r["guide"], jax.random.key(7)))
    return dict(model=name, dim=d, steps=steps, draws=m, lr=lr, estimator=args.estimator,
                methods=out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["logistic_regression", "eight_schools"])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--draws", type=int, default=8, help="ELBO draws per step (all methods)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--estimator", default="sticking_the_landing")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--eval-draws", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    numpyro.enable_x64(False)
    results = []
    print(f"# mean-field VI, adam({args.lr}), {args.draws} draws/step, {args.steps} steps; "
          f"jax {jax.__version__}, numpyro {numpyro.__version__}, blackjax {blackjax.__version__}")
    print(f"{'model':<20} {'method':<9} {'compile s':>9} {'ms/step':>8} {'vs ours':>8} "
          f"{'final ELBO':>16} {'mean err (sd)':>13}")
    for name in args.models:
        r = run_model(name, args)
        results.append(r)
        base = r["methods"]["ours"]["step_ms"]
        for method, row in r["methods"].items():
            print(f"{name:<20} {method:<9} {row['compile_s']:9.2f} {row['step_ms']:8.3f} "
                  f"{row['step_ms'] / base:7.2f}x {row['elbo']:10.2f} ± {row['elbo_se']:.2f} "
                  f"{row['mean_error_sd']:13.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
