"""privtext.analysis.evaluate: classifier utility on perturbed training text, and `privtext evaluate`."""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from privtext.analysis.evaluate import (
    Dataset,
    Setting,
    epsilon_settings,
    evaluate,
    load_dataset,
    matched_settings,
    mean_ci,
    perturb_corpus,
    plot_tradeoff,
    rows_csv,
    stratified_split,
)
from privtext.cli import cli
from privtext.errors import InputFormatError, UsageError
from privtext.mechanisms import create

pytest.importorskip("sklearn")


def _corpus(index, n_docs: int, seed: int) -> Dataset:  # type: ignore[no-untyped-def]
    """Two topics drawn from disjoint bands of real GloVe words, with shared filler words."""
    rng = np.random.default_rng(seed)
    words = index.words
    topics = {"a": words[200:500], "b": words[500:800]}
    filler = words[:100]
    texts, labels = [], []
    for i in range(n_docs):
        label = "a" if i % 2 == 0 else "b"
        doc = list(rng.choice(topics[label], size=6)) + list(rng.choice(filler, size=10))
        rng.shuffle(doc)
        texts.append(" ".join(doc))
        labels.append(label)
    return Dataset(texts, labels, "synthetic")


def test_load_jsonl_csv_tsv_and_gzip(tmp_path: Path) -> None:
    records = [{"body": "first text", "y": 1}, {"body": "second, text", "y": 0}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in records))
    (tmp_path / "d.csv").write_text('body,y\nfirst text,1\n"second, text",0\n')
    (tmp_path / "d.tsv").write_text("body\ty\nfirst text\t1\nsecond, text\t0\n")
    for name in ("d.jsonl", "d.jsonl.gz", "d.csv", "d.tsv"):
        data = load_dataset(str(tmp_path / name), "body", "y")
        assert data.texts == ["first text", "second, text"] and data.labels == ["1", "0"]
        assert data.name == "d"


def test_load_errors_name_line_and_field_not_content(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "secret words", "label": "x"}\n{"text": "more secret"}\n')
    with pytest.raises(InputFormatError) as info:
        load_dataset(str(tmp_path / "bad.jsonl"), "text", "label")
    assert "line 2" in str(info.value) and "'label'" in str(info.value)
    assert "secret" not in str(info.value)
    (tmp_path / "broken.jsonl").write_text("{not json secret\n")
    with pytest.raises(InputFormatError, match="line 1: not valid JSON"):
        load_dataset(str(tmp_path / "broken.jsonl"), "text", "label")
    with pytest.raises(UsageError, match=r"\.jsonl, \.csv or \.tsv"):
        load_dataset(str(tmp_path / "data.xml"), "text", "label")


def test_stratified_split_keeps_label_shares() -> None:
    labels = ["a"] * 80 + ["b"] * 20
    data = Dataset([f"t{i}" for i in range(100)], labels)
    train, test = stratified_split(data, 0.25, np.random.default_rng(3))
    assert len(test) == 25 and test.labels.count("b") == 5
    assert set(train.texts).isdisjoint(test.texts) and len(train) + len(test) == 100
    with pytest.raises(UsageError):
        stratified_split(data, 1.0, np.random.default_rng(3))


def test_mean_ci_is_the_student_t_interval() -> None:
    mean, lo, hi = mean_ci([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} · s / √n with s = 1
    assert mean == 2.0 and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    assert mean_ci([0.5]) == (0.5, None, None)


def test_identity_at_huge_epsilon_and_noise_at_small(glove_small) -> None:  # type: ignore[no-untyped-def]
    data = _corpus(glove_small, 300, 1)
    train, test = stratified_split(data, 0.3, np.random.default_rng(0))
    settings = [Setting("laplace", 1e6), Setting("laplace", 0.5)]
    res = evaluate(glove_small, train, test, settings, repeats=2, seed="x", progress=False)
    clean, vocab, exact, noisy = res.rows
    assert (clean.mechanism, vocab.mechanism) == ("clean", "vocabulary-only")
    assert clean.accuracy > 0.95
    # every word is in the vocabulary, so the ε → ∞ reference and a near-noiseless Laplace train
    # on exactly the clean text
    assert vocab.accuracy == clean.accuracy and vocab.token_unchanged == 1.0
    assert exact.accuracy == clean.accuracy and exact.token_unchanged == 1.0
    assert exact.accuracy_ci_low == exact.accuracy_ci_high == exact.accuracy
    assert noisy.token_unchanged < 0.05 and noisy.accuracy < clean.accuracy
    assert noisy.accuracy_ci_low <= noisy.accuracy <= noisy.accuracy_ci_high
    assert noisy.delta_accuracy == pytest.approx(noisy.accuracy - clean.accuracy)
    assert len(noisy.accuracy_runs) == 2
    again = evaluate(glove_small, train, test, settings, repeats=2, seed="x", progress=False)
    assert again.rows[3].accuracy_runs == noisy.accuracy_runs
    header = rows_csv(res.rows).splitlines()[0]
    assert header.startswith("dataset,mechanism,epsilon,target_unchanged")


def test_repeats_use_independent_noise(glove_small) -> None:  # type: ignore[no-untyped-def]
    mech = create("laplace", glove_small, 6.0, {})
    texts = _corpus(glove_small, 40, 2).texts
    a, share_a = perturb_corpus(glove_small, mech, texts, key=5, stream=1000, oov="mask")
    b, _ = perturb_corpus(glove_small, mech, texts, key=5, stream=1001, oov="mask")
    a2, _ = perturb_corpus(glove_small, mech, texts, key=5, stream=1000, oov="mask")
    assert a == a2 and a != b and 0.0 < share_a < 1.0


def test_perturb_corpus_is_a_caller_of_the_front_door(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.api import Anonymizer

    mech = create("gumbel", glove_small, 300.0, {})
    texts = _corpus(glove_small, 30, 2).texts
    out, _ = perturb_corpus(glove_small, mech, texts, key=5, stream=7, oov="mask")
    # batch 0 of stream 7 is exactly what the library gives for stream (7, 0) with the same key
    assert out == Anonymizer.from_mechanism(mech, key=5).perturb(texts, stream=(7, 0))


def test_oov_policy_is_applied_to_training_text(glove_small) -> None:  # type: ignore[no-untyped-def]
    texts = ["zzqxv " + glove_small.words[300]]
    mech = create("laplace", glove_small, 1e6, {})
    masked, _ = perturb_corpus(glove_small, mech, texts, 1, 0, "mask")
    kept, _ = perturb_corpus(glove_small, mech, texts, 1, 0, "keep")
    assert masked[0].startswith("[OOV]") and kept == texts


def test_matched_settings_calibrate_each_mechanism_and_cache(glove_small) -> None:  # type: ignore[no-untyped-def]
    cache: dict = {}
    settings, skipped = matched_settings(glove_small, ["laplace", "gumbel"], [0.01, 0.5], key=9,
                                         sample=40, draws=20, progress=False, cache=cache)
    got = {(s.mechanism, s.target_unchanged) for s in settings}
    assert ("laplace", 0.5) in got and ("gumbel", 0.5) in got
    assert ("gumbel", 0.01) in {(s.mechanism, s.target_unchanged) for s in skipped}
    assert all(s.median_unchanged <= s.target_unchanged for s in settings)
    again, _ = matched_settings(glove_small, ["laplace", "gumbel"], [0.01, 0.5], key=9,
                                sample=40, draws=20, progress=False, cache=cache)
    assert [s.epsilon for s in again] == [s.epsilon for s in settings]
    explicit = epsilon_settings(glove_small, {"laplace": [1e6]}, key=9, sample=40, draws=10)
    assert explicit[0].median_unchanged == 1.0


def test_tradeoff_plot(glove_small, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    data = _corpus(glove_small, 120, 4)
    train, test = stratified_split(data, 0.3, np.random.default_rng(0))
    settings = [Setting("laplace", e, median_unchanged=m) for e, m in ((4.0, 0.1), (8.0, 0.6))]
    res = evaluate(glove_small, train, test, settings, repeats=2, seed="p", progress=False)
    plot_tradeoff([res, res], str(tmp_path / "t.png"), "macro_f1")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_evaluate_matched(glove_small, cache_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("matplotlib")
    data = _corpus(glove_small, 160, 5)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(data.texts, data.labels)))
    args = ["evaluate", "--data", str(path), "--mechanisms", "laplace,gumbel", "--match-unchanged",
            "0.5", "--repeats", "2", "--vocab-size", "2000", "--cache-dir", str(cache_root), "-q",
            "--sample", "40", "--draws", "20", "--seed", "1", "--csv", str(tmp_path / "e.csv"),
            "--plot", str(tmp_path / "e.png"), "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    mechanisms = [r["mechanism"] for r in out["rows"]]
    assert mechanisms == ["clean", "vocabulary-only", "laplace", "gumbel"]
    assert out["test_size"] == 32 and out["train_size"] == 128
    assert (tmp_path / "e.csv").read_text().count("\n") == 5
    assert (tmp_path / "e.png").exists()


def test_cli_evaluate_usage_errors(glove_small, cache_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a b", "label": "x"}\n')
    base = [sys.executable, "-m", "privtext", "evaluate", "--data", str(path), "--vocab-size", "2000",
            "--cache-dir", str(cache_root), "-q"]
    for extra, needle in (
        (["--mechanisms", "laplace"], b"either --epsilon or --match-unchanged/--match-risk"),
        (["--mechanisms", "nope", "--epsilon", "5"], b"unknown mechanism"),
        (["--mechanisms", "laplace,gumbel", "--epsilon", "5", "--param", "t=1"], b"NAME.KEY=VALUE"),
    ):
        proc = subprocess.run(base + extra, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_risk_matched_settings(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.analysis.evaluate import risk_matched_settings

    cache: dict = {}
    settings, skipped = risk_matched_settings(glove_small, ["santext", "custext"], [0.2, 1e-5],
                                              key=3, sample=40, draws=20, progress=False, cache=cache)
    got = {(s.mechanism, s.target_risk) for s in settings}
    assert ("santext", 0.2) in got and ("custext", 0.2) in got
    assert ("custext", 1e-5) in {(s.mechanism, s.target_risk) for s in skipped}  # below baseline
    assert all(s.attack_success is not None and s.attack_success <= s.target_risk for s in settings)
    assert all(s.median_unchanged is not None for s in settings)


def test_cli_evaluate_match_risk(glove_small, cache_root, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = _corpus(glove_small, 120, 6)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(data.texts, data.labels)))
    args = ["evaluate", "--data", str(path), "--mechanisms", "santext,tem", "--match-risk", "0.3",
            "--match-unchanged", "0.5", "--repeats", "1", "--vocab-size", "2000", "--cache-dir",
            str(cache_root), "-q", "--sample", "40", "--draws", "20", "--seed", "1"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)["rows"]
    risk_rows = [r for r in rows if r["target_risk"] == 0.3]
    assert {r["mechanism"] for r in risk_rows} == {"santext", "tem"}
    assert all(r["attack_success"] <= 0.3 for r in risk_rows)
    assert {r["mechanism"] for r in rows if r["target_unchanged"] == 0.5} == {"santext", "tem"}
    table = CliRunner().invoke(cli, args)
    assert table.exit_code == 0 and "r0.30" in table.output and "attack success" in table.output
