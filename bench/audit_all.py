"""Audit every registered mechanism at two ε values on the default GloVe and print a markdown table.

    python bench/audit_all.py [--vocab-size 5000] [--pairs 12] [--samples 20000] [--seed 2026]
                              [--json results.json]

Each row is one `privtext audit` run (the same library call); the table is what docs/audit.md
shows. Pair words are public vocabulary words of the embedding.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from privtext.analysis import audit
from privtext.embeddings import EmbeddingSource
from privtext.index import IndexSpec, ensure_index
from privtext.mechanisms import available, create, get
from privtext.randomness import chunk_rng, run_key

# Two ε per mechanism, in its own units (rates are not comparable across mechanisms): one where
# most words change and one where most stay. gumbel's are multiples of its floor ε_∞.
EPSILONS: dict[str, tuple[float, float]] = {
    "laplace": (5.0, 20.0),
    "mahalanobis": (5.0, 20.0),
    "vickrey": (5.0, 20.0),
    "santext": (2.0, 10.0),
    "tem": (2.0, 10.0),
    "density": (2.0, 10.0),
    "custext": (1.0, 5.0),
}
GUMBEL_FACTORS = (1.1, 2.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vocab-size", type=int, default=5000)
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--seed", default="2026")
    ap.add_argument("--json", dest="json_path", default=None)
    args = ap.parse_args()

    index = ensure_index(IndexSpec(EmbeddingSource(), args.vocab_size, 64)).index
    rows, results = [], []
    for name in available():
        cls = get(name)
        low, _ = cls.feasible_epsilon(cls.Params(), index.geometry)
        if name in EPSILONS:
            epsilons = EPSILONS[name]
        elif low > 0:
            epsilons = tuple(f * low for f in GUMBEL_FACTORS)
        else:
            epsilons = (1.0, 10.0)  # a plugin without a listed range
        for eps in epsilons:
            mech = create(name, index, eps, {})
            t0 = time.perf_counter()
            mech.prepare()
            rng = chunk_rng(run_key(f"{args.seed}-{name}-{eps}"), 0, 0)
            pairs = audit.select_pairs(index, args.pairs, rng)
            result = audit.run_audit(mech, pairs, args.samples, rng)
            wall = time.perf_counter() - t0
            results.append({**result.to_dict(), "wall_seconds": wall})
            rows.append(_row(result, wall))
            print(f"{name} ε={eps:g}: {wall:.1f} s, flagged={result.flagged}", file=sys.stderr, flush=True)
    header = ("| mechanism | ε | pairs (near/beyond/far) | draws per word | max lower bound, nats "
              "(kind) | its stated bound | smallest stated bound | largest margin (lower − stated) "
              "| support gaps | independence | verdict | wall s |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for row in rows:
        print(row)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"vocab_size": index.n, "results": results}, fh, indent=2)
    return 0


def _row(result: audit.AuditResult, wall: float) -> str:
    covered = [p for p in result.pairs if p.stated_bound is not None]
    kinds = {k: sum(p.kind == k for p in result.pairs) for k in ("near", "beyond-table", "far")}
    best = max(covered, key=lambda p: p.lower_bound) if covered else None
    margin = max((p.lower_bound - p.stated_bound for p in covered), default=-math.inf)  # type: ignore[operator]
    uncovered = len(result.pairs) - len(covered)
    indep = result.independence.verdict if result.independence else "-"
    eps = f"{result.epsilon:.4g}"
    verdict = "FLAGGED" if result.flagged else "ok"
    if uncovered:
        verdict += f" ({uncovered} pairs not covered)"
    return (f"| {result.mechanism} | {eps} | {kinds['near']}/{kinds['beyond-table']}/{kinds['far']} "
            f"| {result.samples} | {_f(best.lower_bound) if best else '-'} ({best.kind if best else '-'}) "
            f"| {_f(best.stated_bound) if best else '-'} "
            f"| {_f(min((p.stated_bound for p in covered), default=None))} "  # type: ignore[type-var]
            f"| {_f(margin)} | {sum(p.support_gap > 0 for p in result.pairs)} | {indep} | {verdict} "
            f"| {wall:.1f} |")


def _f(v: float | None) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.3g}"


if __name__ == "__main__":
    sys.exit(main())
