"""CusText (`custext`): Chen, Li, Wu, Lin, Wang, Xu. Findings of ACL 2023.

Contract: mechanisms.md §8.

The vocabulary is partitioned once per index into groups of K words: walking the words in
frequency order (row order), each word not yet assigned and its K − 1 nearest unassigned words
form a group (the last group holds what is left, n mod K words when K does not divide n). A word
is replaced by a word of its own group, by the exponential mechanism with the normalised utility

    u(x, y) = −(d(x, y) − d_min(x)) / (d_max(x) − d_min(x)) ∈ [−1, 0],
    d_min(x), d_max(x) = min, max of d(x, y') over y' in x's group,

so P[y | x] ∝ exp(ε · u(x, y) / 2). The utility range is 1, hence pure ε-DP between any two words
of the same group. The group itself is a deterministic function of the input: words of different
groups are distinguishable.

The partition uses the exact neighbour table while a word's row still holds K − 1 unassigned
words (the row is sorted, so those are its nearest unassigned words overall) and an exact
float64 search over the unassigned words otherwise. It and the float64 distances from each word to
the members of its group are cached with the index (`derived_artifact`) and memory-mapped, so the
sampler is a gather of one precomputed K-entry cumulative weight row per token and an
inverse-CDF search with one open uniform.

The uniform floor of mechanisms.md §9 (`--param floor`, default 0 = the published mechanism)
gives pairs across groups a bound too: with probability α the output is a uniform word of the
whole vocabulary, so every pair gets ε₀ = ln(1 + (1 − α)·n·q̄/α) with the proven
q̄ = 1/(1 + (s − 1)e^(−ε/2)) (s the smallest group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from privtext.errors import ParameterError
from privtext.index import EmbeddingIndex, Geometry
from privtext.mechanisms.base import (
    GroupForm,
    Guarantee,
    Mechanism,
    MechanismParams,
    pair_ids,
    param,
)
from privtext.mechanisms.floor import (
    UniformFloor,
    auto_floor,
    coin_threshold,
    parse_floor,
    pure_bound,
    realised,
)
from privtext.mechanisms.registry import register
from privtext.mechanisms.sampling import open_uniform

PARTITION_VERSION = 1


@dataclass(frozen=True)
class CusTextParams(MechanismParams):
    K: int = param(20, "group size: each word is replaced by one of the K words of its group",
                   min=2)
    floor: str | float = param(
        0.0, "uniform floor α (mechanisms.md §9): with probability α a token becomes a uniformly "
             "random word of the whole vocabulary, which bounds pairs across groups too; 0 = the "
             "published mechanism (groups distinguishable); auto = the smallest α that gives "
             "every pair the within-group rate ε", range_text="0 | auto | [2^-40, 1]")

    def validate(self, geometry: Geometry) -> None:
        super().validate(geometry)
        parse_floor(self.floor)
        if self.K > geometry.n:
            raise ParameterError(
                f"--param K={self.K} is larger than the vocabulary; valid: [2, {geometry.n}]"
            )


def build_partition(index: EmbeddingIndex, k: int) -> np.ndarray:
    """(groups, k) int32 member ids, −1 padded, in the order groups were formed."""
    n = index.n
    vectors = np.asarray(index.vectors, dtype=np.float64)
    norms = np.einsum("ij,ij->i", vectors, vectors)
    table = np.asarray(index.neighbor_ids)
    assigned = np.zeros(n, dtype=bool)
    groups = np.full((-(-n // k), k), -1, dtype=np.int32)
    g = 0
    for anchor in range(n):  # once per index, in the parent; each pass forms one group
        if assigned[anchor]:
            continue
        row = table[anchor]
        free = row[~assigned[row]]  # sorted by distance, anchor first
        if len(free) >= k:
            members = free[:k]
        else:
            members = _nearest_unassigned(vectors, norms, assigned, anchor, k)
        assigned[members] = True
        groups[g, : len(members)] = members
        g += 1
    return groups[:g]


def _nearest_unassigned(vectors: np.ndarray, norms: np.ndarray, assigned: np.ndarray,
                        anchor: int, k: int) -> np.ndarray:
    """The k nearest unassigned words to `anchor` (itself first), by exact distance then id.

    One matrix-vector product ranks every word (‖y‖² − 2⟨x, y⟩ orders like the distance); the
    best k + 8 are then re-ranked by directly computed float64 distances, so the rounding of the
    expansion cannot change which words are chosen.
    """
    score = norms - 2.0 * (vectors @ vectors[anchor])
    score[assigned] = np.inf
    remaining = int((~assigned).sum())
    take = min(k, remaining)
    shortlist_size = min(k + 8, remaining)
    if shortlist_size < len(score):
        shortlist = np.argpartition(score, shortlist_size - 1)[:shortlist_size]
    else:
        shortlist = np.flatnonzero(~assigned)
    shortlist = shortlist[~assigned[shortlist]]
    exact = np.linalg.norm(vectors[shortlist] - vectors[anchor], axis=1)
    order = np.lexsort((shortlist, exact))[:take]
    return shortlist[order]


def build_member_distances(index: EmbeddingIndex, groups: np.ndarray) -> np.ndarray:
    """(n, k) float64: d(x, members of x's group), aligned with its group row, inf as padding."""
    n, k = index.n, groups.shape[1]
    vectors = np.asarray(index.vectors, dtype=np.float64)
    group_of = group_index(groups, n)
    out = np.empty((n, k), dtype=np.float64)
    for start in range(0, n, 8192):
        x = np.arange(start, min(start + 8192, n))
        members = groups[group_of[x]]
        diff = vectors[np.maximum(members, 0)] - vectors[x][:, None, :]
        d = np.sqrt(np.einsum("tkm,tkm->tk", diff, diff))
        d[members < 0] = np.inf
        d[members == x[:, None]] = 0.0
        out[x] = d
    return out


def group_index(groups: np.ndarray, n: int) -> np.ndarray:
    """The group of every word, from the member table."""
    group_of = np.full(n, -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(groups)), groups.shape[1]).reshape(groups.shape)
    valid = groups >= 0
    group_of[groups[valid]] = rows[valid]
    return group_of


def group_sizes_for(n: int, k: int) -> tuple[int, int]:
    """(number of groups, size of the last group) of a partition of n words into groups of k."""
    return -(-n // k), (n % k) or k


def max_output_probability(epsilon: float, smallest_group: int) -> float:
    """q̄ ≥ max_{x,y} Q(y|x) for the in-group exponential mechanism.

    Proof: in a group of s words, Q(y|x) = e^{εu(x,y)/2} / Σ_z e^{εu(x,z)/2} with u ∈ [−1, 0];
    the numerator is at most 1 and each of the other s − 1 terms at least e^{−ε/2}, so
    Q(y|x) ≤ 1/(1 + (s − 1)e^{−ε/2}), largest for the smallest group. Rounded up one ulp."""
    value = 1.0 / (1.0 + (smallest_group - 1) * math.exp(-epsilon / 2.0))
    return min(1.0, math.nextafter(value, math.inf))


def floor_for(epsilon: float, params: CusTextParams, n: int) -> tuple[float, float]:
    """(realised α, q̄): auto = the smallest α whose ε₀ is at most the within-group ε."""
    _, last = group_sizes_for(n, params.K)
    qbar = max_output_probability(epsilon, min(params.K, last))
    requested = parse_floor(params.floor)
    if requested is None:
        return auto_floor(epsilon, n, qbar), qbar
    return realised(requested), qbar


@register
class CusTextMechanism(Mechanism):
    name = "custext"
    summary = ("partition the vocabulary into groups of K near words; exponential mechanism "
               "with normalised distance utility inside the group")
    reference = "Chen, Li, Wu, Lin, Wang, Xu. Findings of ACL 2023"
    guarantee_summary = ("pure ε-DP between words of the same group; words of different groups "
                         "are distinguishable unless --param floor > 0, which bounds every pair")
    Params = CusTextParams

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        assert self.guarantee.floor is not None
        self.floor = UniformFloor(self.guarantee.floor, index.n)
        self._groups: np.ndarray | None = None
        self._member_dist: np.ndarray | None = None
        self._group_of: np.ndarray | None = None
        self._cdf: np.ndarray | None = None
        self._members: np.ndarray | None = None
        self._sizes: np.ndarray | None = None

    @property
    def k(self) -> int:
        return int(self.params.K)  # type: ignore[attr-defined]

    @classmethod
    def privacy_map(cls, epsilon: float, params: MechanismParams, geometry: Geometry) -> Guarantee:
        assert isinstance(params, CusTextParams)
        count, last = group_sizes_for(geometry.n, params.K)
        alpha, qbar = floor_for(epsilon, params, geometry.n)
        caveats = [
            "the partition comes from the public embedding only (frequency order and distances)",
        ]
        if last == 1:
            caveats.append("the last group holds a single word, which Q always outputs unchanged")
        conditions = [
            f"{count} groups of K = {params.K} words (the last holds {last}), formed in "
            "frequency order from each word's nearest unassigned words",
            "P[y|x] ∝ exp(ε·u(x, y)/2) over x's group with u = −(d − d_min)/(d_max − d_min) "
            "∈ [−1, 0]",
        ]
        if alpha == 0.0:
            return Guarantee(
                kind="pure", rate=epsilon, metric=None, per_token_pure_bound=None,
                statement=("pure ε-DP between words of the same group; words of different groups "
                           f"are distinguishable (ε = {epsilon:g}, groups of K = {params.K})"),
                conditions=(*conditions,
                            f"within a group the per-token pure bound is ε = {epsilon:g}; across "
                            "groups there is none (floor = 0)"),
                caveats=("the output is always a word of the input's group, so it reveals which "
                         "group the input belongs to", *caveats),
                floor=0.0, floor_qbar=None,
                warnings=("custext floor=0: words of different groups are distinguishable (no "
                          "bound across groups); --param floor=auto or a number gives every pair "
                          "a bound",),
            )
        eps0 = pure_bound(alpha, geometry.n, qbar)
        within = min(epsilon, eps0)
        return Guarantee(
            kind="pure", rate=epsilon, metric=None, per_token_pure_bound=eps0,
            statement=(f"pure ε-DP between words of the same group (ε = {epsilon:g}, groups of "
                       f"K = {params.K}) and pure ε₀-DP between any two words, ε₀ = {eps0:.6g}, "
                       f"by the uniform floor α = {alpha:.3g}"),
            conditions=(
                *conditions,
                f"uniform floor α = {alpha:.6g} (realised exactly: an integer coin on [0, 2^53) "
                f"below {coin_threshold(alpha)}); q̄ = {qbar:.6g} = 1/(1 + (s − 1)e^(−ε/2)) for "
                f"the smallest group s = {min(params.K, last)} (no output of Q is likelier)",
                f"every pair: P[y|x]/P[y|x'] ≤ 1+(1 − α)·n·q̄/α, so ε₀ = {eps0:.6g} nats per "
                f"token (randomized-response mixing argument); within a group min(ε, ε₀) = "
                f"{within:.6g}",
            ),
            caveats=tuple(caveats), floor=alpha, floor_qbar=qbar,
        )

    def privacy_loss(self, x_ids: np.ndarray, x2_ids: np.ndarray) -> np.ndarray:
        """Same group: ε (min(ε, ε₀) with a floor: the mixture never raises Q's ratio).
        Different groups: inf without a floor (disjoint supports), ε₀ with one."""
        x, x2 = pair_ids(x_ids, x2_ids)
        eps0 = self.guarantee.per_token_pure_bound
        across = math.inf if eps0 is None else eps0
        same = self.group_of(x) == self.group_of(x2)
        out = np.where(same, min(self.epsilon, across), across).astype(np.float64)
        out[x == x2] = 0.0
        return out

    def closed_form(self) -> GroupForm:
        members, probs = self.group_distribution(np.arange(self.index.n))
        return GroupForm(members=members, probabilities=probs, floor=self.floor.alpha)

    def _artifacts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._groups is None or self._member_dist is None or self._group_of is None:
            key = {"K": self.k, "version": PARTITION_VERSION}
            groups = self.index.derived_artifact(
                "custext-groups", key, lambda index: build_partition(index, self.k))
            self._member_dist = self.index.derived_artifact(
                "custext-member-distances", key,
                lambda index: build_member_distances(index, np.asarray(groups)))
            self._group_of = group_index(np.asarray(groups), self.index.n)
            self._groups = groups
        return self._groups, self._member_dist, self._group_of

    def prepare(self) -> None:
        self._artifacts()

    def derived(self) -> dict[str, Any]:
        groups, _, _ = self._artifacts()
        sizes = (np.asarray(groups) >= 0).sum(axis=1)
        return {
            "group_size_K": self.k,
            "groups": len(sizes),
            "smallest_group": int(sizes.min()),
            "largest_group": int(sizes.max()),
            "singleton_groups": int((sizes == 1).sum()),
        }

    def group_of(self, ids: np.ndarray) -> np.ndarray:
        """The group number of each word id (public: it is what the output reveals)."""
        return self._artifacts()[2][np.asarray(ids, dtype=np.int64)]

    def _scores(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ε/2)·u(x, y) for each input's group members (−inf for padding), and the members."""
        groups, member_dist, group_of = self._artifacts()
        dist = np.asarray(member_dist[ids], dtype=np.float64)
        members = np.asarray(groups[group_of[ids]], dtype=np.int64)
        real = members >= 0
        d_min = np.where(real, dist, np.inf).min(axis=1, keepdims=True)
        d_max = np.where(real, dist, -np.inf).max(axis=1, keepdims=True)
        spread = d_max - d_min
        # A one-word group has no spread: its only member (the word itself) has utility 0.
        utility = -(dist - d_min) / np.where(spread > 0, spread, 1.0)
        scores = np.where(real, self.epsilon / 2.0 * utility, -np.inf)
        return scores, members

    def _sampling_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per word: its group's members, the cumulative weights exp(ε·u/2) over them, and the
        group size. u does not depend on the token, so each word's CDF is computed once per
        process (n × K float64, about 15 MB at 92k words) and sampling is a gather and a search."""
        if self._cdf is None or self._members is None or self._sizes is None:
            n = self.index.n
            members = np.empty((n, self.k), dtype=np.int32)
            cdf = np.empty((n, self.k), dtype=np.float64)
            for start in range(0, n, 16384):
                stop = min(start + 16384, n)
                scores, mem = self._scores(np.arange(start, stop))
                weights = np.exp(scores - scores.max(axis=1, keepdims=True))  # padding: exp(−inf) = 0
                np.cumsum(weights, axis=1, out=cdf[start:stop])
                members[start:stop] = mem
            self._sizes = (members >= 0).sum(axis=1)
            self._members, self._cdf = members, cdf
        return self._members, self._cdf, self._sizes

    def group_distribution(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Q without the floor, per word: its group's members ((len, K) ids, −1 padding) and
        their exact probabilities (0 on padding), in float64."""
        ids = np.asarray(ids, dtype=np.int64)
        members = np.empty((len(ids), self.k), dtype=np.int64)
        probs = np.empty((len(ids), self.k), dtype=np.float64)
        for start in range(0, len(ids), 16384):
            part = slice(start, start + 16384)
            scores, mem = self._scores(ids[part])
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))  # padding: exp(−inf) = 0
            probs[part] = weights / weights.sum(axis=1, keepdims=True)
            members[part] = mem
        return members, probs

    def probabilities(self, word: int) -> np.ndarray:
        """Exact output distribution of `word` over the vocabulary, floor included (for audits
        and tests)."""
        scores, members = self._scores(np.array([word], dtype=np.int64))
        weights = np.exp(scores[0] - scores[0].max())
        out = np.zeros(self.index.n)
        real = members[0] >= 0
        out[members[0][real]] = weights[real] / weights[real].sum()
        return self.floor.mix(out) if self.floor.alpha > 0 else out

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Inverse CDF over the group: the first member whose cumulative weight exceeds U·total,
        U an open uniform, is drawn with probability exactly weight / total."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return ids.copy()
        members, cdf, sizes = self._sampling_tables()
        rows = cdf[ids]
        target = open_uniform(rng, len(ids)) * rows[:, -1]
        pos = (rows <= target[:, None]).sum(axis=1)
        # U·total can round up to total itself (probability ~1e-16): stay on a real member.
        pos = np.minimum(pos, sizes[ids] - 1)
        return self.floor.apply(ids, members[ids, pos].astype(np.int64), rng)
