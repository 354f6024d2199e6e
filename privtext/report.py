"""The epsilon report: what was guaranteed, to what, with which randomness, and what was counted.

It never contains corpus text, tokens, file names or noisy values: only parameters, the index's
public identity and geometry, counts and timings.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from privtext import __version__
from privtext.randomness import seed_commitment
from privtext.run.perturb import PerturbOutcome
from privtext.settings import OnError
from privtext.text import OovPolicy

LIMITATIONS = (
    "ε values are not comparable across mechanisms or embeddings; compare mechanisms at equal "
    "measured privacy (e.g. the share of words left unchanged), not at equal ε",
    "the guarantee is per token; a document of t perturbed tokens composes to at most "
    "t · (per-token pure bound), and documents of different lengths are not covered",
    "output length reveals input length (tokens are replaced one for one)",
    "punctuation, whitespace and out-of-vocabulary words are not perturbed by the mechanism and "
    "are outside the guarantee",
)


def document_bound_stats(doc_hist: np.ndarray, per_token_bound: float | None) -> dict[str, Any]:
    """Distribution over documents of perturbed-token count and worst-case pure bound."""
    docs = int(doc_hist.sum())
    if docs == 0:
        return {"documents": 0}
    counts = np.arange(len(doc_hist))
    nonzero = np.flatnonzero(doc_hist)
    cumulative = np.cumsum(doc_hist)
    p95 = int(np.searchsorted(cumulative, 0.95 * docs))
    stats: dict[str, Any] = {
        "documents": docs,
        "perturbed_tokens": {
            "max": int(nonzero.max()),
            "mean": float((counts * doc_hist).sum() / docs),
            "p95": p95,
        },
    }
    if per_token_bound is not None:
        stats["pure_bound"] = {k: v * per_token_bound for k, v in stats["perturbed_tokens"].items()}
    else:
        stats["pure_bound"] = None
    return stats


def build_report(outcome: PerturbOutcome) -> dict[str, Any]:
    mech = outcome.mechanism
    index = mech.index
    c = outcome.counters
    settings = outcome.settings
    guarantee = mech.guarantee.to_dict()
    oov_policy = OovPolicy(settings.oov)
    report: dict[str, Any] = {
        "tool": {"name": "privtext", "version": __version__},
        "mechanism": {
            "name": mech.name,
            "reference": mech.reference,
            "epsilon": mech.epsilon,
            "params": mech.params.to_dict(),
            "derived": mech.derived(),
        },
        "guarantee": guarantee,
        "metric": index.geometry.metric,
        "embedding": index.identity(),
        "geometry": index.geometry.to_dict(),
        "randomness": {
            "mode": "seeded" if settings.seed is not None else "os-entropy",
            "seed_sha256": seed_commitment(settings.seed),
            "keyed_by": "run key, input number, chunk index",
            "warning": (
                "a known seed lets anyone reproduce the noise and voids the privacy of this run"
                if settings.seed is not None else None
            ),
        },
        "input": {
            "format": outcome.fmt,
            "inputs": outcome.inputs,
            "field": None if outcome.fmt == "text" else settings.field,
            "chunk_size": settings.chunk_size,
            "workers": outcome.workers,
            **({"shards": outcome.shards} if outcome.shards is not None else {}),
        },
        "run": {
            "resumed": outcome.resumed is not None,
            **({"resume": outcome.resumed} if outcome.resumed is not None else {}),
        },
        "counts": {
            "records": c.records,
            "tokens": c.word_tokens + c.other_tokens,
            "word_tokens": c.word_tokens,
            "other_tokens": c.other_tokens,
            "perturbed": c.perturbed,
            "unchanged": c.unchanged,
            "unchanged_share": (c.unchanged / c.perturbed) if c.perturbed else None,
            "oov": {"policy": oov_policy.value, "count": c.oov,
                    "masked": c.oov if oov_policy is OovPolicy.MASK else 0,
                    "dropped": c.oov if oov_policy is OovPolicy.DROP else 0,
                    "passed_through": c.oov if oov_policy is OovPolicy.KEEP else 0},
            "errors": {"policy": OnError(settings.on_error).value, "skipped": c.errors_skipped,
                       "kept_unchanged": c.errors_kept},
            "null_values": c.null_values,
        },
        "per_document": document_bound_stats(c.doc_hist, guarantee["per_token_pure_bound"]),
        "timing": {
            "seconds": round(outcome.seconds, 3),
            "word_tokens_per_second": round(c.word_tokens / outcome.seconds, 1) if outcome.seconds else None,
        },
        "limitations": list(LIMITATIONS),
        "flags": [],
    }
    if oov_policy is OovPolicy.KEEP:
        report["flags"].append(
            f"--oov keep: {c.oov} out-of-vocabulary tokens were passed through unperturbed and "
            "are not protected"
        )
    if c.errors_kept:
        report["flags"].append(
            f"--on-error keep: {c.errors_kept} unreadable records were copied unchanged and are not protected"
        )
    if mech.guarantee.approximate:
        report["flags"].append("the sampler only approximates the stated distribution; see guarantee")
    return report


def to_json(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, ensure_ascii=False) + "\n"


def summary(report: dict[str, Any]) -> str:
    """A few lines for stderr."""
    g = report["guarantee"]
    c = report["counts"]
    m = report["mechanism"]
    bound = g["per_token_pure_bound"]
    doc = report["per_document"]
    share = c["unchanged_share"]
    lines = [
        f"privtext: {m['name']} ε={m['epsilon']:g}: {g['kind']} guarantee, rate {g['rate']:g}"
        + (f" ({g['metric']})" if g["metric"] else "")
        + (f", per-token pure bound {bound:.4g}" if bound is not None else ""),
        f"privtext: {g['statement']}",
        f"privtext: {c['records']} records, {c['word_tokens']} words: {c['perturbed']} perturbed"
        + (f" ({share:.1%} unchanged)" if share is not None else "")
        + f", {c['oov']['count']} out of vocabulary ({c['oov']['policy']})"
        + f", {c['errors']['skipped'] + c['errors']['kept_unchanged']} bad records",
    ]
    if doc.get("documents") and doc.get("pure_bound"):
        lines.append(
            f"privtext: per-document pure bound: mean {doc['pure_bound']['mean']:.4g}, "
            f"p95 {doc['pure_bound']['p95']:.4g}, max {doc['pure_bound']['max']:.4g}"
        )
    lines.append(f"privtext: {report['timing']['word_tokens_per_second'] or 0:,.0f} words/s "
                 f"in {report['timing']['seconds']:.2f} s")
    for flag in report["flags"]:
        lines.append(f"privtext: WARNING: {flag}")
    return "\n".join(lines) + "\n"
