"""The epsilon report: the attack-success figure (cached with the index), the floor's flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privtext.index import EmbeddingIndex

VOCAB = ["--vocab-size", "2000"]


@pytest.fixture
def env(glove_small: EmbeddingIndex, cache_root: Path) -> dict[str, str]:
    return {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}


def perturb(env: dict[str, str], tmp_path: Path, *args: str) -> tuple[dict, str]:  # type: ignore[type-arg]
    src = tmp_path / "in.txt"
    src.write_text("the president met the minister\nmarkets fell on monday\n")
    report = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "privtext", "perturb", str(src), "--format", "text",
                           "-o", str(tmp_path / "out.txt"), "--report", str(report), "--workers", "1",
                           *VOCAB, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(report.read_text()), proc.stderr


def test_report_carries_attack_success_for_both_priors(env: dict[str, str], tmp_path: Path,
                                                      glove_small: EmbeddingIndex) -> None:
    from privtext.analysis import risk
    from privtext.mechanisms import create

    data, stderr = perturb(env, tmp_path, "--mechanism", "santext", "--epsilon", "4")
    section = data["attack_success"]
    for prior in ("uniform", "zipf"):
        r = section[prior]
        assert r["method"] == "exact" and r["baseline"] <= r["attack_success"] <= 1
    assert "lower bound on risk" in section["meaning"]
    assert "attack success (exact)" in stderr
    # the library's figure on the same index (the run read it back from the index cache)
    direct = risk.attack_success(create("santext", glove_small, 4.0, {}), risk.PRIORS)
    assert section["zipf"]["attack_success"] == pytest.approx(direct["zipf"].attack_success, rel=1e-12)
    assert list((glove_small.path / "derived").glob("attack-success-*.npy"))


def test_default_gumbel_report_states_the_floor(env: dict[str, str], tmp_path: Path) -> None:
    data, stderr = perturb(env, tmp_path, "--epsilon", "300")
    g = data["guarantee"]
    assert data["mechanism"]["name"] == "gumbel" and g["published_statement_covered"] is True
    assert g["floor"] >= 2.0**-40 and g["floor_qbar"] == 1.0
    assert g["per_token_pure_bound"] <= 300 * data["geometry"]["delta_min"]
    assert not data["flags"] and "WARNING" not in stderr
    assert data["attack_success"]["uniform"]["method"] == "monte-carlo"
    lo, hi = data["attack_success"]["uniform"]["interval"]
    assert lo <= data["attack_success"]["uniform"]["attack_success"] <= hi


def test_floor_zero_is_flagged_and_risk_can_be_skipped(env: dict[str, str], tmp_path: Path) -> None:
    data, stderr = perturb(env, tmp_path, "--epsilon", "300", "--param", "floor=0", "--no-risk")
    assert any("floor=0" in f and "unprotected" in f for f in data["flags"])
    assert data["guarantee"]["per_token_pure_bound"] is None
    assert "skipped" in data["attack_success"]
    warnings = [line for line in stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "floor=0" in warnings[0]
