"""The ``ppl`` command line. :data:`SUBCOMMANDS` is an immutable mapping name → (add arguments,
run, help), built once below (nothing registers itself).

    ppl generate "Why is the sky blue?" --max-new-tokens 128 --temperature 0.7 --top-p 0.9
    ppl generate "Write a short sentence about a cat." --particles 16 --constraint lipogram --temperature 0.8
    ppl scale --task letter_words --methods pf,bon --budgets 1,2,4,8
    ppl diffuse --class 3 --method fk --particles 8 --out threes.png
"""

from __future__ import annotations

import argparse
import os
import sys
from types import MappingProxyType
from typing import Callable, Mapping


# ----------------------------------------------------------------------------- ppl generate
def _generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the user message (rendered through the model's chat template)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.2,
                   help="sampling temperature; 0 is greedy (default 0.2, as SmolLM2's card suggests)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k most likely tokens")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 disables)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    p.add_argument("--system", default=None, help="optional system message")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--gguf", default=None, help="GGUF file to use instead of the embedded SmolLM2")
    p.add_argument("--hf", default=None, help="Hugging Face checkpoint directory to use instead")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "mixed"], default="float32",
                   help="weights and activations; 'mixed': bfloat16 matmuls, float32 activations and KV "
                        "cache (fastest on CPUs with bf16 units)")
    p.add_argument("--no-cache", action="store_true", help="do not use the on-disk JAX compilation cache")
    p.add_argument("--particles", type=int, default=None,
                   help="steer with a particle filter of this many particles over words, the "
                        "--constraint as process reward (instead of one streamed sample)")
    p.add_argument("--constraint", default="lipogram",
                   help="with --particles: the constraint (lipogram: no letter 'e')")
    p.add_argument("--max-steps", type=int, default=24, help="with --particles: most words")


def _enable_compilation_cache() -> None:
    import jax

    path = os.environ.get("PPL_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ppl-fk", "jax"))
    try:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception:  # a read-only home or an old jax: just compile every time
        pass


def load_model(args):
    """``(model, tokenizer)`` chosen by the ``--gguf`` / ``--hf`` options (default: embedded SmolLM2)."""
    import jax.numpy as jnp

    from models.llm import load_gguf, load_hf, load_smollm2, with_matmul_dtype

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    if args.gguf and args.hf:
        raise ValueError("give at most one of --gguf and --hf")
    if args.gguf:
        model, tok, _ = load_gguf(args.gguf, dtype=dtype)
    elif args.hf:
        model, tok, _ = load_hf(args.hf, dtype=dtype)
        if tok is None:
            raise ValueError(f"{args.hf!r} has no tokenizer.json")
    else:
        model, tok, _ = load_smollm2(dtype=dtype)
    if args.dtype == "mixed":
        model = with_matmul_dtype(model, jnp.bfloat16)
    return model, tok


def run_generate(args: argparse.Namespace, out=None) -> int:
    import jax

    from models.llm import Sampling
    from models.llm.generate import stream_text

    out = out or sys.stdout
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k,
                        top_p=None if args.top_p == 1 else args.top_p)
    if not args.no_cache:
        _enable_compilation_cache()
    if args.particles is not None:
        _check_steering(args)
    model, tok = load_model(args)
    if args.particles is not None:
        return _run_steered(args, model, tok, sampling, out)
    stats: dict = {}
    for piece in stream_text(model, tok, args.prompt, jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
                             sampling=sampling, chat=not args.raw, system=args.system, stats=stats):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    rate = (stats["tokens"] - 1) / stats["decode_s"] if stats["tokens"] > 1 and stats["decode_s"] > 0 else float("nan")
    print(f"[{stats['tokens']} tokens; first token after {stats['first_token_s']:.2f} s (prefill and "
          f"compilation), then {rate:.1f} tokens/s]", file=sys.stderr)
    return 0


def _check_steering(args) -> None:
    from app.steer import CONSTRAINTS

    if args.particles < 1:
        raise ValueError(f"--particles must be >= 1, got {args.particles}")
    if args.constraint not in CONSTRAINTS:
        raise ValueError(f"unknown --constraint {args.constraint!r}; choose from {sorted(CONSTRAINTS)}")
    if args.raw or args.system:
        raise ValueError("--particles uses the chat template without a system message")
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")


def _run_steered(args, model, tok, sampling, out) -> int:
    """``ppl generate --particles N``: the particle filter of :mod:`app.steer`."""
    import jax

    from app.steer import CONSTRAINTS, steer
    from models.llm_fk.step_lm import StepLM

    c = CONSTRAINTS[args.constraint]
    lm = StepLM(model, tok, tok.token_ids_containing(" "), None, sampling)
    res = steer(lm, args.prompt, c, jax.random.key(args.seed), num_particles=args.particles,
                max_steps=args.max_steps)
    out.write(res.text + "\n")
    out.flush()
    print(f"[particle filter, {args.particles} particles over words, constraint {c.name}: "
          f"{'satisfied' if res.satisfied else 'NOT satisfied'}; {res.tokens} tokens generated; "
          f"run {res.run_s:.1f} s, compilation {res.compile_s:.1f} s]", file=sys.stderr)
    return 0




# ----------------------------------------------------------------------------- ppl scale
def _scale_arguments(p: argparse.ArgumentParser) -> None:
    from app.scale import _add_arguments, _help_epilog

    p.epilog = _help_epilog()

    _add_arguments(p)


def run_scale(args: argparse.Namespace) -> int:
    from app.scale import run_scale as _run

    _enable_compilation_cache()  # a rerun (or --resume) skips the per-(method, budget) compiles
    return _run(args)


# ----------------------------------------------------------------------------- ppl diffuse
def _diffuse_arguments(p: argparse.ArgumentParser) -> None:
    from app.diffuse import add_arguments

    add_arguments(p)


def run_diffuse(args: argparse.Namespace) -> int:
    from app.diffuse import run_diffuse as _run

    return _run(args)


# name -> (add_arguments(parser), run(args) -> exit code, help)
SUBCOMMANDS: Mapping[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = \
    MappingProxyType({
        "generate": (_generate_arguments, run_generate,
                     "chat-generate with an LLM (default: the embedded SmolLM2-135M-Instruct), streaming"),
        "scale": (_scale_arguments, run_scale,
                  "accuracy vs budget of inference-time scaling methods (the registry app.methods.METHODS: "
                  "PF, PG, PT-PG, BoN, beam, DVTS, ...) on a task family"),
        "diffuse": (_diffuse_arguments, run_diffuse,
                    "digits from the shipped diffusion model, steered to a class (FK steering, best-of-N "
                    "at equal NFE, or the conditional model), written as a PNG grid"),
    })


# ----------------------------------------------------------------------------- entry point
class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends ``(default: …)`` to option help that does not state its default already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl", description="Feynman-Kac particle algorithms in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (add_arguments, _, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_,
                           formatter_class=_DefaultsFormatter)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _, run, _ = SUBCOMMANDS[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"ppl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
