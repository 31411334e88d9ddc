"""App layer: the ``ppl`` command line, the demo and the LLM experiment harnesses.

- :mod:`app.cli`: the ``ppl`` console script (``ppl generate``, ``ppl scale``);
- :mod:`app.demo`: the stochastic-volatility particle-filter demo (``python -m app.demo``);
- :mod:`app.methods`: ``run_method``, every inference-time scaling method on the LLM state-space model;
- :mod:`app.tasks`: the programmatically checked LLM task suite;
- :mod:`app.scale`: the inference-time scaling experiment (``ppl scale``).

The top of the layers (app → models → samplers → ppl): it may import every package below it, and
nothing imports it (``tests/test_layers.py``). Submodules are imported on demand, so ``ppl --help``
loads no model.
"""
