"""The epsilon report: what was guaranteed, to what, with which randomness, and what was counted.

It never contains corpus text, tokens, file names or noisy values: only parameters, the index's
public identity and geometry, counts and timings.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

import privtext
from privtext.counters import Counters
from privtext.spec import RunSpec
from privtext.text import OovPolicy

if TYPE_CHECKING:
    from privtext.run.perturb import PerturbOutcome

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


def attack_success_section(mechanism: Any, notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The §10 figure for the run's mechanism (uniform and zipf priors), cached with the index:
    computed once per (index, mechanism, ε, params), then read back. `notify` hears one line
    when the figure is computed rather than read back (the first time can take a minute)."""
    from privtext.analysis.risk import PRIORS, cached_attack_success

    def announce() -> None:
        if notify is not None:
            notify("computing the attack-success figure for the report (once per index, "
                   "mechanism, ε and params, then cached; --no-risk skips it)")

    results = cached_attack_success(mechanism, PRIORS, on_compute=announce)
    out: dict[str, Any] = {}
    for prior, r in results.items():
        d = r.to_dict()
        out[prior] = {k: d[k] for k in ("attack_success", "baseline", "bound", "method", "interval",
                                        "draws")}
    first = next(iter(results.values()))
    out["estimate"] = first.estimate
    out["meaning"] = ("the chance that an adversary who knows the mechanism, the index and a "
                      "public prior guesses a perturbed word's original from the output alone; "
                      "context-aware attackers can do better: read it as a lower bound on risk")
    return out



def build_report(spec: RunSpec | Any, counters: Counters | dict[str, Any] | None = None,
                 run_info: dict[str, Any] | None = None, *, risk: bool = True,
                 notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The epsilon report of a run from its spec, its merged counters and how it ran.

    The one report builder: the CLI, the library (`Anonymizer.report()`) and the engines all call
    it. `counters` may be a `Counters` or its `to_dict()`. `run_info` (all optional):
    ``seconds``, ``input`` (a dict printed as the report's input section), ``engine`` (a dict:
    name, partitioning, how streams were keyed), ``keyed_by`` (how randomness was keyed),
    ``on_error`` (the bad-record policy, when records were parsed), ``attack_success`` (the
    section `attack_success_section` computes; absent, the report says where to get it).

    Called with a single `PerturbOutcome` (the former signature), it builds the CLI's report.
    """
    if counters is None and hasattr(spec, "settings") and hasattr(spec, "mechanism"):
        return report_from_outcome(spec, risk=risk, notify=notify)
    if counters is None:
        counters = Counters()
    c = counters if isinstance(counters, Counters) else Counters.from_dict(counters)
    info = dict(run_info or {})
    seconds = info.get("seconds")
    guarantee = spec.guarantee
    oov_policy = OovPolicy(spec.oov)
    report: dict[str, Any] = {
        "tool": {"name": "privtext", "version": privtext.__version__},
        "mechanism": {
            "name": spec.mechanism,
            "reference": spec.reference,
            "epsilon": spec.epsilon,
            "params": spec.params,
            "derived": spec.derived,
        },
        "guarantee": guarantee,
        "metric": spec.geometry.get("metric"),
        "embedding": spec.embedding,
        "geometry": spec.geometry,
        "randomness": {
            "mode": "seeded" if spec.seeded else "os-entropy",
            "seed_sha256": spec.seed_sha256,
            "keyed_by": info.get("keyed_by", "run key, stream id"),
            "warning": (
                "a known seed lets anyone reproduce the noise and voids the privacy of this run"
                if spec.seeded else None
            ),
        },
        "engine": info.get("engine", {"name": "local"}),
        "input": info.get("input", {}),
        "run": info.get("run", {"resumed": False}),
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
            "errors": {"policy": info.get("on_error"), "skipped": c.errors_skipped,
                       "kept_unchanged": c.errors_kept},
            "null_values": c.null_values,
        },
        "per_document": document_bound_stats(c.doc_hist, guarantee["per_token_pure_bound"]),
        "attack_success": info.get("attack_success",
                                   {"skipped": "not computed for this run; privtext risk computes it"}),
        "timing": {
            "seconds": round(seconds, 3) if seconds is not None else None,
            "word_tokens_per_second": round(c.word_tokens / seconds, 1) if seconds else None,
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
    for warning in guarantee.get("warnings") or ():
        report["flags"].append(warning)
    if guarantee.get("approximate"):
        report["flags"].append("the sampler only approximates the stated distribution; see guarantee")
    return report


def report_from_outcome(outcome: PerturbOutcome, risk: bool = True,
                        notify: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The CLI's report: the same core as every other caller, fed from a finished local run."""
    settings = outcome.settings
    spec = RunSpec.from_mechanism(outcome.mechanism, OovPolicy(settings.oov).value, settings.mask_token,
                                  settings.seed)
    run_info = {
        "seconds": outcome.seconds,
        "keyed_by": "run key, input number, chunk index",
        "on_error": getattr(settings.on_error, "value", settings.on_error),
        "engine": {"name": "local", "workers": outcome.workers},
        "input": {
            "format": outcome.fmt,
            "inputs": outcome.inputs,
            "field": None if outcome.fmt == "text" else settings.field,
            "chunk_size": settings.chunk_size,
            "workers": outcome.workers,
            **({"shards": outcome.shards} if getattr(outcome, "shards", None) is not None else {}),
        },
        "run": {
            "resumed": outcome.resumed is not None,
            **({"resume": outcome.resumed} if outcome.resumed is not None else {}),
        },
    }
    if risk:
        run_info["attack_success"] = attack_success_section(outcome.mechanism, notify)
    else:
        run_info["attack_success"] = {"skipped": "left out with --no-risk; privtext risk computes it"}
    return build_report(spec, outcome.counters, run_info)


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
    risk = report.get("attack_success") or {}
    if "uniform" in risk:
        u, z = risk["uniform"], risk.get("zipf")
        lines.append(
            f"privtext: attack success ({u['method']}): {u['attack_success']:.3g} with a uniform "
            f"prior (baseline {u['baseline']:.2g})"
            + (f", {z['attack_success']:.3g} with a zipf prior (baseline {z['baseline']:.2g})" if z else ""))
    recall = m.get("derived", {}).get("hnsw_recall")
    if recall:
        lines.append(
            f"privtext: nearest-word search: HNSW (approximate, efSearch {recall['efSearch']}), "
            f"recall@1 {recall['recall_at_1_zipf']:.3f} (Zipf-weighted words) / "
            f"{recall['recall_at_1_uniform']:.3f} (uniform words) on noisy queries vs exact search"
        )
    if report["timing"]["seconds"] is not None:
        lines.append(f"privtext: {report['timing']['word_tokens_per_second'] or 0:,.0f} words/s "
                     f"in {report['timing']['seconds']:.2f} s")
    for flag in report["flags"]:
        lines.append(f"privtext: WARNING: {flag}")
    return "\n".join(lines) + "\n"
