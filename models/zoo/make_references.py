"""Make the stored reference posteriors of the model zoo.

    python -m models.zoo.make_references [name ...]

Without names: every model whose reference file is missing (pass names, or ``--all``, to
regenerate existing ones; the logistic regression's file predates the zoo and is regenerated only
by name). Prints a summary (method, worst split R-hat, minimum ESS, divergences) per model.
Long NUTS runs: minutes of CPU.
"""

from __future__ import annotations

import os
import sys
import time

from models.zoo import ZOO, get


def main(argv: list[str]) -> None:
    if "--all" in argv:
        names = [e.name for e in ZOO if e.name != "logistic_regression"]
    elif argv:
        names = argv
    else:
        names = [e.name for e in ZOO if not os.path.exists(e.reference_path)]
    for n in names:
        entry = get(n)
        t0 = time.perf_counter()
        rec = entry.make_reference()
        took = time.perf_counter() - t0
        diag = {k: rec.get(k) for k in ("max_r_hat", "min_ess", "divergences", "quadrature_check",
                                         "log_evidence", "mode_weights") if k in rec}
        print(f"{n}: wrote {entry.reference_path} in {took:.0f} s; {rec['method']}; {diag}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
