"""The black-box audit must flag deliberately broken mechanisms and pass the real ones.

Each mutant is a subclass of a real mechanism with one classic mistake. The vocabularies are
small and shaped so that the stated guarantee is nearly tight for some pair and output (words on
a line, with outputs beyond the pair), which is where a mistake shows: in 50-dimensional GloVe
the metric guarantees are far from tight and no sampling audit could tell a halved noise scale
from the right one. Seeds are fixed, so each test is deterministic; the power comes from the
mutants being caught, the validity from the correct mechanisms never being flagged.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from privtext.analysis import audit
from privtext.index import EmbeddingIndex
from privtext.mechanisms import available, create, get
from privtext.mechanisms.base import Mechanism
from privtext.mechanisms.floor import UniformFloor
from privtext.mechanisms.gumbel import GumbelParams, TruncatedGumbelMechanism, min_epsilon
from privtext.mechanisms.laplace import LaplaceMechanism, laplace_noise
from privtext.mechanisms.nearest import nearest_words

# --- vocabularies ---------------------------------------------------------------------------------


def line_vectors(positions: list[float], dim: int = 2) -> np.ndarray:
    """Words on the diagonal line through the origin (so L1 and L2 distances differ by √2)."""
    direction = np.ones(dim) / math.sqrt(dim)
    return np.asarray(positions, dtype=np.float64)[:, None] * direction[None, :]


LINE = [-0.8, -0.4, 0.0, 1.0, 2.0, 3.0, 4.0]  # a left cluster, the pair (0, 1), far words


@pytest.fixture
def line_index(index_factory) -> EmbeddingIndex:  # type: ignore[no-untyped-def]
    return index_factory(line_vectors(LINE), neighbors=len(LINE))


def triangle_index(index_factory, neighbors: int) -> EmbeddingIndex:  # type: ignore[no-untyped-def]
    """Three words, all pairs about Δ_min apart: the smallest stated gumbel bound, ≈ 7.3 nats."""
    return index_factory(np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 0.88]]), neighbors=neighbors)


def run(mechanism: Mechanism, samples: int, seed: int = 0, independence: bool = False) -> audit.AuditResult:
    return audit.run_audit(mechanism, audit.all_pairs(mechanism.index), samples,
                           np.random.default_rng(seed), independence=independence)


def assert_flagged(result: audit.AuditResult) -> None:
    worst = max((p for p in result.pairs if p.stated_bound is not None),
                key=lambda p: p.lower_bound - p.stated_bound)  # type: ignore[operator]
    assert result.flagged, (f"mutant not caught: best lower bound {worst.lower_bound:.3g} vs "
                            f"stated {worst.stated_bound:.3g}")


# --- mutants --------------------------------------------------------------------------------------


class HalvedNoise(LaplaceMechanism):
    """Noise scale halved: radius Gamma(m, 1/(2ε)) while still claiming rate ε."""

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += laplace_noise(rng, len(ids), self.index.dim, 2.0 * self.epsilon)
        return nearest_words(self.index, noisy, ids, k=1)[0][:, 0]


class WrongMetric(LaplaceMechanism):
    """Per-coordinate Laplace(1/ε) noise: metric DP in the L1 metric, claimed for Euclidean d.
    On the diagonal, ‖·‖₁ = √2‖·‖₂, so the true rate is √2 ε."""

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += rng.laplace(0.0, 1.0 / self.epsilon, size=noisy.shape)
        return nearest_words(self.index, noisy, ids, k=1)[0][:, 0]


class FixedSeed(LaplaceMechanism):
    """Ignores the injected generator: every chunk reuses the same seed."""

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return super().perturb_ids(ids, np.random.default_rng(1234))


class CapTooSmall(TruncatedGumbelMechanism):
    """Candidate count capped at 2 instead of the table width K."""

    def sample_counts(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.minimum(super().sample_counts(rng, size), 2)


def _santext_missing_factor() -> type[Mechanism]:
    from privtext.mechanisms.fullvocab import FullVocabularySampler
    from privtext.mechanisms.santext import SanTextMechanism

    class MissingFactorTwo(SanTextMechanism):
        """P ∝ exp(−ε d) instead of exp(−ε d/2): the exponential mechanism without its 2."""

        def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
            super().__init__(index, epsilon, params)
            self.sampler = FullVocabularySampler(index, self.epsilon, lo=self.cut)

    return MissingFactorTwo


def _tem_sign_flipped() -> type[Mechanism]:
    import privtext.mechanisms.tem as tem_module

    class GumbelSignFlipped(tem_module.TruncatedExponentialMechanism):
        """argmax(score − G) instead of argmax(score + G): no longer ∝ exp(score)."""

        def _from_table(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            original = tem_module.standard_gumbel
            tem_module.standard_gumbel = lambda r, shape: -original(r, shape)
            try:
                return super()._from_table(ids, rng)
            finally:
                tem_module.standard_gumbel = original

    return GumbelSignFlipped


def _require(name: str) -> None:
    if name not in available():
        pytest.skip(f"mechanism {name!r} is not registered yet")


# --- mutants are flagged --------------------------------------------------------------------------


def test_flags_halved_noise_scale(line_index: EmbeddingIndex) -> None:
    assert_flagged(run(HalvedNoise(line_index, 2.0), 100_000))


def test_flags_wrong_metric(line_index: EmbeddingIndex) -> None:
    assert_flagged(run(WrongMetric(line_index, 2.0), 200_000))


def test_flags_missing_factor_of_two(line_index: EmbeddingIndex) -> None:
    _require("santext")
    cls = _santext_missing_factor()
    assert_flagged(run(cls(line_index, 2.0, cls.Params()), 100_000))


def test_flags_gumbel_sign_flipped(line_index: EmbeddingIndex) -> None:
    _require("tem")
    cls = _tem_sign_flipped()
    assert_flagged(run(cls(line_index, 2.0, cls.Params()), 50_000))


def test_flags_truncation_cap_too_small(index_factory) -> None:  # type: ignore[no-untyped-def]
    index = triangle_index(index_factory, neighbors=3)
    eps = 1.001 * min_epsilon(3, index.geometry.delta_min)
    # floor=0: the published sampler, whose full-table statement ε·d the cap breaks (with the
    # default floor the stated bound is ε₀ for every pair and the floor hides the cap's zeros).
    assert_flagged(run(CapTooSmall(index, eps, GumbelParams(floor="0")), 100_000))


def test_flags_fixed_seed_reused_across_chunks(line_index: EmbeddingIndex) -> None:
    result = audit.audit_independence(FixedSeed(line_index, 1.0), [2, 3],
                                      rng=np.random.default_rng(0))
    assert result.verdict == "EXCEEDS" and "across chunks" in result.note
    full = audit.run_audit(FixedSeed(line_index, 1.0), audit.all_pairs(line_index)[:3], 2_000,
                           np.random.default_rng(0))
    assert full.flagged


class FloorClaimedNotDrawn(TruncatedGumbelMechanism):
    """States the default floor's bound but never draws the floor: the bare published sampler
    behind a guarantee that needs the floor."""

    def __init__(self, index, epsilon, params=None):  # type: ignore[no-untyped-def]
        super().__init__(index, epsilon, params)
        self.floor = UniformFloor(0.0, index.n)


def test_flags_gumbel_floor_claimed_but_not_drawn(index_factory) -> None:  # type: ignore[no-untyped-def]
    """The third word of the triangle is never a candidate for the first with a two-wide table:
    without the floor the ratio is unbounded, so the stated ε₀ (≈ 7.3 nats) is refuted."""
    index = triangle_index(index_factory, neighbors=2)
    eps = 1.001 * min_epsilon(3, index.geometry.delta_min)
    result = run(FloorClaimedNotDrawn(index, eps), 100_000)
    assert_flagged(result)
    assert any(p.verdict == "EXCEEDS" and p.rank is None for p in result.pairs)


def test_real_gumbel_beyond_its_table(index_factory) -> None:  # type: ignore[no-untyped-def]
    """The same vocabulary with the real mechanism. Default floor: every pair is covered and none
    exceeds. floor=0: the map states no bound for the pair beyond the table (mechanisms.md §2,
    known doubt) and the audit sees the support gap that makes it unbounded."""
    index = triangle_index(index_factory, neighbors=2)
    eps = 1.001 * min_epsilon(3, index.geometry.delta_min)
    floored = run(create("gumbel", index, eps, {}), 100_000)
    assert not floored.flagged and all(p.stated_bound is not None for p in floored.pairs)
    bare = run(create("gumbel", index, eps, {"floor": "0"}), 100_000)
    beyond = [p for p in bare.pairs if p.verdict == "not covered"]
    assert beyond and all(p.support_gap > 0 for p in beyond)


# --- correct mechanisms are not flagged -----------------------------------------------------------

CORRECT_PARAMS: dict[str, dict[str, str]] = {"custext": {"K": "3"}}


@pytest.mark.parametrize("name", sorted(available()))
def test_correct_mechanisms_pass(name: str, line_index: EmbeddingIndex, index_factory) -> None:  # type: ignore[no-untyped-def]
    """Same vocabularies and sample sizes as the mutants (so the audit had the power to see a
    mistake there), real mechanisms: nothing may be flagged, independence included."""
    if name == "gumbel":
        index = triangle_index(index_factory, neighbors=3)
        m = create(name, index, 1.001 * min_epsilon(3, index.geometry.delta_min), {})
    else:
        cls = get(name)
        low, _ = cls.feasible_epsilon(cls.Params(), line_index.geometry)
        # a future mechanism with an ε floor is audited just above it
        m = create(name, line_index, 2.0 if low == 0 else 1.3 * low, CORRECT_PARAMS.get(name, {}))
    result = run(m, 100_000, seed=1, independence=True)
    bad = [(p.x, p.x2, p.lower_bound, p.stated_bound) for p in result.pairs if p.verdict == "EXCEEDS"]
    assert not result.flagged, f"{name} flagged: {bad}, independence {result.independence}"
    assert result.independence is not None and result.independence.verdict in ("ok", "inconclusive")


def test_santext_plus_relaxed_guarantee_passes(line_index: EmbeddingIndex) -> None:
    _require("santext")
    m = create("santext", line_index, 2.0, {"plus": "true", "w": "0.5", "p": "0.3"})
    result = run(m, 50_000, seed=2)
    assert not result.flagged
    assert all(p.stated_bound is not None for p in result.pairs)


# --- the pieces -----------------------------------------------------------------------------------


def test_clopper_pearson_bounds() -> None:
    from scipy.stats import binomtest

    for c, n in ((0, 50), (7, 50), (50, 50), (300, 1000)):
        ci = binomtest(c, n).proportion_ci(confidence_level=0.9, method="exact")
        assert math.isclose(float(audit.cp_lower(c, n, 0.05)), ci.low, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(float(audit.cp_upper(c, n, 0.05)), ci.high, rel_tol=1e-9, abs_tol=1e-12)


def test_select_pairs_on_glove(glove_small: EmbeddingIndex) -> None:
    pairs = audit.select_pairs(glove_small, 9, np.random.default_rng(3))
    assert len(pairs) == 9
    kinds = {p.kind for p in pairs}
    assert kinds == {"near", "far", "beyond-table"}
    for p in pairs:
        if p.kind == "near":
            assert p.rank is not None and 1 <= p.rank <= 3
        else:
            assert p.rank is None  # outside x's neighbour table


def test_audit_on_glove_laplace(glove_small: EmbeddingIndex) -> None:
    """End to end on the real embedding: the result serialises and nothing is flagged."""
    m = create("laplace", glove_small, 10.0, {})
    result = audit.run_audit(m, audit.select_pairs(glove_small, 3, np.random.default_rng(4)),
                             2_000, np.random.default_rng(5))
    assert not result.flagged
    doc = json.loads(json.dumps(result.to_dict()))
    assert doc["mechanism"] == "laplace" and len(doc["pairs"]) == 3
    assert "verdict" in audit.format_table(result)


def test_unknown_words_are_not_echoed(glove_small: EmbeddingIndex) -> None:
    from privtext.errors import UsageError

    with pytest.raises(UsageError) as info:
        audit.pairs_from_words(glove_small, ["the", "zqxjsecretword"])
    assert "zqxjsecretword" not in str(info.value)


def test_pure_pairs_across_groups_are_not_covered(line_index: EmbeddingIndex) -> None:
    _require("custext")
    m = create("custext", line_index, 1.0, {"K": "3"})
    covs = [audit.coverage(m, p) for p in audit.all_pairs(line_index)]
    assert any(c.bound is None for c in covs) and any(c.bound == 1.0 for c in covs)



# --- the command ----------------------------------------------------------------------------------


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "privtext", "audit", *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def cli_env(glove_small: EmbeddingIndex, cache_root: Path) -> dict[str, str]:
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}


def test_cli_audit_passes_a_correct_mechanism(cli_env: dict[str, str]) -> None:
    proc = _cli(cli_env, "--mechanism", "laplace", "--epsilon", "10", "--vocab-size", "2000",
                "--pairs", "3", "--samples", "400", "--seed", "1", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["flagged"] is False and {p["kind"] for p in doc["pairs"]} == {"near", "far", "beyond-table"}
    table = _cli(cli_env, "--mechanism", "laplace", "--epsilon", "10", "--vocab-size", "2000",
                 "--words", "president,minister", "--samples", "400", "-q")
    assert table.returncode == 0 and "no pair exceeds" in table.stdout


_MUTANT_PLUGIN = """
import sys
from privtext.cli import main
from privtext.mechanisms.floor import UniformFloor
from privtext.mechanisms.gumbel import TruncatedGumbelMechanism
from privtext.mechanisms.registry import register


@register
class FloorClaimedNotDrawn(TruncatedGumbelMechanism):
    name = "gumbel-floor-not-drawn"

    def __init__(self, index, epsilon, params=None):
        super().__init__(index, epsilon, params)
        self.floor = UniformFloor(0.0, index.n)


sys.argv = ["privtext", *sys.argv[1:]]
main()
"""


def test_cli_audit_exits_1_when_the_guarantee_is_exceeded(tmp_path: Path) -> None:
    """A plugin mechanism registered through the public `register` path (in a real process)
    that states the floor's bound without drawing the floor, on a three-word embedding with a
    two-wide table (see above): the command prints the verdict and exits 1."""
    vectors = tmp_path / "tri.txt"
    vectors.write_text("alpha 1.0 1.0\nbeta 2.0 1.0\ngamma 1.5 1.88\n")
    env = {**os.environ, "PRIVTEXT_CACHE": str(tmp_path / "cache")}
    args = ["audit", "--epsilon", "7.21", "--embeddings", str(vectors),
            "--embeddings-format", "glove", "--vocab-size", "3", "--neighbors", "2",
            "--samples", "100000", "--seed", "3", "-q"]
    proc = subprocess.run([sys.executable, "-c", _MUTANT_PLUGIN, *args, "--mechanism",
                           "gumbel-floor-not-drawn"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "EXCEEDS" in proc.stdout and "FLAGGED" in proc.stdout
    real = _cli(env, *args[1:], "--mechanism", "gumbel")
    assert real.returncode == 0, real.stdout + real.stderr
    assert "no pair exceeds" in real.stdout


def test_cli_audit_usage_errors(cli_env: dict[str, str]) -> None:
    both = _cli(cli_env, "--mechanism", "laplace", "--epsilon", "1", "--vocab-size", "2000",
                "--pairs", "2", "--words", "a,b")
    assert both.returncode == 2 and "either --pairs or --words" in both.stderr
    unknown = _cli(cli_env, "--mechanism", "laplace", "--epsilon", "1", "--vocab-size", "2000",
                   "--words", "the,zqxjsecretword", "-q")
    assert unknown.returncode == 2 and "zqxjsecretword" not in unknown.stderr + unknown.stdout
    assert len(unknown.stderr.strip().splitlines()) == 1


class MapOnlyPlugin(Mechanism):
    """A third-party mechanism that declares only its Guarantee (no privacy_loss of its own):
    Laplace's sampler and statement."""

    name = "map-only-plugin"
    summary = reference = "test plugin"

    @classmethod
    def privacy_map(cls, epsilon, params, geometry):  # type: ignore[no-untyped-def]
        return LaplaceMechanism.privacy_map(epsilon, params, geometry)

    def perturb_ids(self, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        noisy = np.asarray(self.index.vectors[ids], dtype=np.float64)
        noisy += laplace_noise(rng, len(ids), self.index.dim, self.epsilon)
        return nearest_words(self.index, noisy, ids, k=1)[0][:, 0]


def test_a_plugin_is_audited_from_its_guarantee_alone(line_index: EmbeddingIndex) -> None:
    plugin = MapOnlyPlugin(line_index, 2.0)
    real = LaplaceMechanism(line_index, 2.0)
    x, x2 = np.array([0, 1, 2, 3]), np.array([1, 1, 5, 6])
    np.testing.assert_allclose(plugin.privacy_loss(x, x2), real.privacy_loss(x, x2), rtol=1e-12)
    assert plugin.privacy_loss(x, x2)[1] == 0.0
    result = run(plugin, 20_000, seed=4)
    assert not result.flagged and all(p.stated_bound is not None for p in result.pairs)
