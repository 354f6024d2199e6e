"""SanText and SanText+ (`santext`): Yue, Du, Wang, Li, Sun, Chow. Findings of ACL 2021.

Contract: mechanisms.md §7.

SanText replaces every word x by y drawn from the whole vocabulary with
P[y | x] ∝ exp(−ε · d(x, y) / 2): the exponential mechanism with utility −d, whose sensitivity is
1 per unit of distance by the triangle inequality, hence metric DP at rate ε.

SanText+ (`plus=true`) splits the vocabulary by the public row order (never by the corpus): the
least frequent fraction w of the rows is the sensitive set V_S (a contiguous range of high ids).
A sensitive word is always replaced by y drawn from V_S with the same weights; a non-sensitive
word is replaced the same way with probability p, else kept.

Sampling: `FullVocabularySampler` (see fullvocab.py and envelope.py) draws exactly this
categorical distribution without scanning the vocabulary per word: the neighbour table's exact
weights plus rejection from an envelope that bounds every word beyond the table, a few float64
distances per token; the most frequent words are drawn by rejection from their distance-sorted
rows (sortedrows.py), the other words with an extended list with cluster bounds (clusters.py).
No n × n matrix exists at any point (the reference implementation needs 13.5 GB for a 100k
vocabulary). The keep/replace coin of SanText+ uses its own open uniform per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import Geometry
from privtext.mechanisms.base import (
    ExponentialForm,
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_distances,
    pair_ids,
    param,
)
from privtext.mechanisms.fullvocab import FullVocabularySampler
from privtext.mechanisms.laplace import metric_guarantee
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import open_uniform

DEFAULT_SENSITIVE_FRACTION = 0.9
DEFAULT_REPLACE_PROBABILITY = 0.3


@dataclass(frozen=True)
class SanTextParams(MechanismParams):
    plus: bool = param(False, "SanText+: only the least frequent fraction w of the vocabulary is "
                              "sensitive; other words are replaced with probability p")
    w: float | None = param(None, "SanText+ sensitive fraction of the vocabulary, least frequent "
                                  f"rows (default {DEFAULT_SENSITIVE_FRACTION} with plus=true)",
                            min=0, max=1, min_open=True)
    p: float | None = param(None, "SanText+ probability of replacing a non-sensitive word "
                                  f"(default {DEFAULT_REPLACE_PROBABILITY} with plus=true)",
                            min=0, max=1, min_open=True)

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        if not self.plus and (self.w is not None or self.p is not None):
            raise ParameterError("--param w and p apply only to SanText+; add --param plus=true "
                                 "or leave them out")

    @property
    def sensitive_fraction(self) -> float:
        return self.w if self.w is not None else DEFAULT_SENSITIVE_FRACTION

    @property
    def replace_probability(self) -> float:
        return self.p if self.p is not None else DEFAULT_REPLACE_PROBABILITY


def sensitive_start(n: int, fraction: float) -> int:
    """First id of V_S: the least frequent ⌈w · n⌉ rows (at least one word)."""
    count = min(n, max(1, math.ceil(fraction * n - 1e-9)))
    return n - count


@register
class SanTextMechanism(Mechanism):
    name = "santext"
    summary = ("exponential mechanism over the whole vocabulary, P ∝ exp(−ε·d/2); SanText+ "
               "replaces only sensitive (rare) words for sure")
    reference = "Yue, Du, Wang, Li, Sun, Chow. Findings of ACL 2021"
    guarantee_summary = ("metric DP at rate ε (Euclidean); SanText+ gives a relaxed guarantee: "
                         "kept non-sensitive words are not protected")
    Params = SanTextParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        p: SanTextParams = self.params  # type: ignore[assignment]
        self.cut = sensitive_start(index.n, p.sensitive_fraction) if p.plus else 0
        self.sampler = FullVocabularySampler(index, self.epsilon / 2.0, lo=self.cut)

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, SanTextParams)
        if not params.plus:
            return metric_guarantee(
                epsilon, geometry, geometry.metric,
                f"metric DP at rate ε = {epsilon:g} per unit of Euclidean distance: for any two "
                "words x, x' and output y, P[y|x] ≤ exp(ε·d(x, x'))·P[y|x']",
                conditions=(
                    "P[y|x] ∝ exp(−ε·d(x, y)/2) over the whole vocabulary (exact sampling in "
                    "float64: table weights plus envelope rejection, or inverse CDF)",
                    f"per-token pure bound ε·Δ_max with Δ_max = {geometry.delta_max:.4g} "
                    f"({geometry.delta_max_kind})",
                ),
            )
        w, p = params.sensitive_fraction, params.replace_probability
        cut = sensitive_start(geometry.n, w)
        sensitive = geometry.n - cut
        mixed = math.log(1.0 / p)
        return Guarantee(
            kind="relaxed",
            rate=epsilon,
            metric=geometry.metric,
            per_token_pure_bound=None,
            statement=(
                f"utility-optimised metric LDP (SanText+): sensitive words (the least frequent "
                f"w = {w:g} of the vocabulary, {sensitive} words) are always replaced by a "
                f"sensitive word, and for outputs y in that set P[y|x] ≤ exp(ε·d(x, x'))·P[y|x'] "
                f"at ε = {epsilon:g} when x and x' are both sensitive or both non-sensitive, "
                f"exp(ε·d(x, x') + ln(1/p)) = exp(ε·d(x, x') + {mixed:.4g}) otherwise; a "
                f"non-sensitive word is kept with probability 1 − p = {1 - p:g}, and a kept word "
                "reveals its input: non-sensitive words have no privacy guarantee"
            ),
            conditions=(
                f"sensitive set V_S = ids {cut}..{geometry.n - 1} by the public frequency order "
                "of the embedding, never by the corpus",
                f"replacement P[y|x] ∝ exp(−ε·d(x, y)/2) over y in V_S; p = {p:g}",
                f"per-token pure bound between two sensitive words ε·Δ_max with Δ_max = "
                f"{geometry.delta_max:.4g} ({geometry.delta_max_kind})",
            ),
            caveats=(
                "outputs outside V_S are kept non-sensitive inputs, so they identify their input",
                "which words are sensitive is decided by the embedding's frequency order, which "
                "may not match what is sensitive in your corpus",
            ),
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """SanText: ε·d. SanText+: ε·d between two sensitive words; inf when either word is
        non-sensitive, since a kept word is an output the other input never gives."""
        x, x2 = pair_ids(x_ids, x2_ids)
        out = self.epsilon * pair_distances(self.index, x, x2)
        if self.params.plus:  # type: ignore[attr-defined]
            out[(x < self.cut) | (x2 < self.cut)] = np.inf
            out[x == x2] = 0.0
        return out

    def privacy_loss_on_outputs(self, x_ids: np.ndarray, x2_ids: np.ndarray
                                ) -> tuple[np.ndarray, np.ndarray | None]:
        """SanText+'s relaxed statement: for outputs in V_S, ε·d plus ln(1/p) for a mixed pair
        (one sensitive, one not: the non-sensitive one reaches V_S only with probability p)."""
        p: SanTextParams = self.params  # type: ignore[assignment]
        if not p.plus:
            return self.privacy_loss(x_ids, x2_ids), None
        x, x2 = pair_ids(x_ids, x2_ids)
        mixed = (x >= self.cut) != (x2 >= self.cut)
        out = self.epsilon * pair_distances(self.index, x, x2)
        out += np.where(mixed, math.log(1.0 / p.replace_probability), 0.0)
        mask = np.zeros(self.index.n, dtype=bool)
        mask[self.cut :] = True
        return out, mask

    def closed_form(self) -> ExponentialForm:
        p: SanTextParams = self.params  # type: ignore[assignment]
        return ExponentialForm(scale=self.epsilon / 2.0, lo=self.cut,
                               keep=(1.0 - p.replace_probability) if p.plus else 0.0)

    def derived(self) -> dict[str, Any]:
        p: SanTextParams = self.params  # type: ignore[assignment]
        out: dict[str, Any] = {"exponent_scale": self.epsilon / 2.0,
                               "sampler": "exact: rejection from sorted rows (frequent words), "
                                          "cluster bounds (listed words) or table-radius bins"}
        if p.plus:
            out.update({
                "sensitive_fraction_w": p.sensitive_fraction,
                "replace_probability_p": p.replace_probability,
                "sensitive_words": self.index.n - self.cut,
                "first_sensitive_id": self.cut,
            })
        return out

    def prepare(self) -> None:
        self.sampler.prepare()

    def probabilities(self, word: int) -> np.ndarray:
        """Exact output distribution of `word` over the vocabulary (for audits and tests)."""
        out = np.zeros(self.index.n)
        out[self.cut :] = self.sampler.probabilities(word)
        p: SanTextParams = self.params  # type: ignore[assignment]
        if p.plus and word < self.cut:
            out *= p.replace_probability
            out[word] += 1.0 - p.replace_probability
        return out

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        p: SanTextParams = self.params  # type: ignore[assignment]
        if not p.plus:
            return self.sampler.sample(ids, rng)
        coin = open_uniform(rng, len(ids))
        replace = (ids >= self.cut) | (coin < p.replace_probability)
        out = ids.copy()
        out[replace] = self.sampler.sample(ids[replace], rng)
        return out
