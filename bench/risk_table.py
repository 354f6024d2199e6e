"""Attack success (mechanisms.md §10) of every mechanism at two ε, and gumbel at several floors.

    python bench/risk_table.py [--vocab-size 100000] [--only NAME,...] [--json rows.jsonl]

One row per setting: the stated pure per-token bound, the attack success under the uniform and
zipf priors with their baselines and bounds, the method (exact or Monte-Carlo lower bound) and
the wall and CPU time of the risk computation (`privtext risk` does the same library call; the
CPU time, summed over threads, is what the work costs on an idle machine). Rows print
as they finish (markdown), so a partial run is still a table. This is the table in README.md and
docs/audit.md; re-run it on an idle machine to re-measure the times.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from privtext.analysis import risk
from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index
from privtext.mechanisms import create
from privtext.mechanisms.gumbel import min_epsilon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_all import EPSILONS, GUMBEL_FACTORS

# The same two ε per mechanism as the audit table (rates are not comparable across mechanisms,
# which is why this table exists); gumbel's are multiples of ε_∞ of the index.
GUMBEL_FLOORS = ("auto", "0.01", "0.05", "0.2", "0")


def settings(n: int, delta_min: float, only: set[str] | None) -> list[tuple[str, float, dict[str, str]]]:
    out: list[tuple[str, float, dict[str, str]]] = []
    for name, values in EPSILONS.items():
        out += [(name, e, {}) for e in values]
    out += [("custext", 5.0, {"floor": "auto"})]
    floor = min_epsilon(n, delta_min)
    for factor in GUMBEL_FACTORS:
        out += [("gumbel", round(factor * floor, 4), {"floor": f}) for f in GUMBEL_FLOORS]
    return [s for s in out if only is None or s[0] in only]


def fmt(v: float | None, spec: str = ".3g") -> str:
    if v is None:
        return "none"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=100_000)
    ap.add_argument("--only", default=None, help="comma-separated mechanism names")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--json", default=None, help="append one JSON object per row here")
    args = ap.parse_args()
    index = ensure_index(IndexSpec(EmbeddingSource(), args.vocab_size, 64), None, progress=False).index
    geo = index.geometry
    only = set(args.only.split(",")) if args.only else None
    print(f"index: {geo.n} words, Δ_min = {geo.delta_min:.4g}, Δ_max ≤ {geo.delta_max:.4g}, "
          f"ε_∞(gumbel) = {min_epsilon(geo.n, geo.delta_min):.4g}", flush=True)
    print("| mechanism | ε | params | pure bound ε₀ (nats) | uniform: success (baseline, bound) | "
          "zipf: success (baseline, bound) | method | wall s | CPU s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, eps, params in settings(geo.n, geo.delta_min, only):
        m = create(name, index, eps, params)
        t0, c0 = time.perf_counter(), time.process_time()
        res = risk.attack_success(m, risk.PRIORS, np.random.default_rng(args.seed))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        u, z = res["uniform"], res["zipf"]

        def cell(r: risk.RiskResult) -> str:
            ci = "" if r.method == "exact" else f" [{r.interval[0]:.3g}, {r.interval[1]:.3g}]"
            return f"{r.attack_success:.3g}{ci} ({r.baseline:.2g}, {fmt(r.bound, '.2g')})"

        p = ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
        print(f"| {name} | {eps:g} | {p} | {fmt(m.guarantee.per_token_pure_bound, '.4g')} | "
              f"{cell(u)} | {cell(z)} | {u.method} | {seconds:.0f} | {cpu:.0f} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps({"mechanism": name, "epsilon": eps, "params": params,
                                     "pure_bound": m.guarantee.per_token_pure_bound,
                                     "uniform": u.to_dict(), "zipf": z.to_dict(),
                                     "seconds": seconds, "cpu_seconds": cpu}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
