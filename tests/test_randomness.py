"""Randomness discipline: injected generators only, open uniforms, float64 sampling, seeded runs
reproduce and unseeded ones do not, and the report commits to a seed only by its hash.

(Byte-identical output across --workers is tested in test_cli.py.)
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import privtext
from privtext.index import EmbeddingIndex
from privtext.mechanisms import available, create, get
from privtext.mechanisms.sampling import open_uniform, standard_gumbel
from privtext.randomness import chunk_rng, run_key, seed_commitment

PACKAGE = Path(privtext.__file__).parent
# Constructors of independent generators are fine; anything else under np.random is a sampler
# or seeder of the legacy global state.
ALLOWED_NP_RANDOM = {"Generator", "SeedSequence", "BitGenerator", "PCG64", "PCG64DXSM", "Philox",
                     "SFC64", "MT19937", "default_rng"}


def global_randomness_uses(source: str, filename: str) -> list[str]:
    """Every use of the `random` module or of numpy's global random state in `source`."""
    tree = ast.parse(source, filename)
    numpy_names: set[str] = set()  # names bound to numpy
    np_random_names: set[str] = set()  # names bound to numpy.random
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "random" or alias.name.startswith("random."):
                    found.append(f"{filename}:{node.lineno}: import {alias.name}")
                elif alias.name == "numpy":
                    numpy_names.add(alias.asname or "numpy")
                elif alias.name == "numpy.random":
                    if alias.asname:
                        np_random_names.add(alias.asname)
                    else:
                        numpy_names.add("numpy")
        elif isinstance(node, ast.ImportFrom):
            if node.module == "random" or (node.module or "").startswith("random."):
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            elif node.module == "numpy":
                np_random_names.update(a.asname or a.name for a in node.names if a.name == "random")
            elif node.module == "numpy.random":
                for a in node.names:
                    if a.name not in ALLOWED_NP_RANDOM:
                        found.append(f"{filename}:{node.lineno}: from numpy.random import {a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        via_numpy = (isinstance(base, ast.Attribute) and base.attr == "random"
                     and isinstance(base.value, ast.Name) and base.value.id in numpy_names)
        via_alias = isinstance(base, ast.Name) and base.id in np_random_names
        if (via_numpy or via_alias) and node.attr not in ALLOWED_NP_RANDOM:
            found.append(f"{filename}:{node.lineno}: np.random.{node.attr}")
    return found


def test_no_module_uses_global_random_state() -> None:
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    for path in files:
        problems += global_randomness_uses(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not problems, "global randomness in the package:\n" + "\n".join(problems)


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nx = np.random.rand(3)",
    "import numpy\nnumpy.random.seed(0)",
    "import numpy.random as npr\nnpr.normal()",
    "from numpy import random\nrandom.choice([1])",
    "from numpy.random import shuffle",
    "import random\nrandom.random()",
    "from random import randint",
    "import secrets, random",
])
def test_the_scan_catches_global_randomness(snippet: str) -> None:
    """The scan itself must be able to fail."""
    assert global_randomness_uses(snippet, "<mutant>")


def test_the_scan_allows_injected_generators() -> None:
    ok = ("import numpy as np\n"
          "def f(rng: np.random.Generator):\n"
          "    return rng.normal(), np.random.Generator(np.random.PCG64(np.random.SeedSequence(1)))")
    assert global_randomness_uses(ok, "<ok>") == []


class _Extremes:
    """Stands in for a Generator at the two ends of the integer grid open_uniform draws from."""

    def integers(self, low: int, high: int, size: int, dtype: type) -> np.ndarray:
        return np.array([low, high - 1] * (size // 2), dtype=dtype)


def test_open_uniform_is_strictly_inside_the_unit_interval() -> None:
    u = open_uniform(_Extremes(), 2)  # type: ignore[arg-type]
    assert u.dtype == np.float64
    assert 0.0 < u[0] and u[1] < 1.0
    assert np.isfinite(np.log(u)).all() and np.isfinite(np.log1p(-u)).all()
    assert np.isfinite(standard_gumbel(_Extremes(), 2)).all()  # type: ignore[arg-type]
    draws = open_uniform(np.random.default_rng(0), 1_000_000)
    assert draws.dtype == np.float64 and draws.min() > 0.0 and draws.max() < 1.0


def test_sampling_primitives_are_float64() -> None:
    from privtext.mechanisms.laplace import laplace_noise

    rng = np.random.default_rng(1)
    assert standard_gumbel(rng, 4).dtype == np.float64
    assert laplace_noise(rng, 3, 5, 1.0).dtype == np.float64


def test_chunk_streams_depend_on_key_input_and_chunk_only() -> None:
    key = run_key("k")
    a = chunk_rng(key, 0, 3).integers(0, 2**62, 8)
    assert np.array_equal(a, chunk_rng(key, 0, 3).integers(0, 2**62, 8))
    for other in (chunk_rng(key, 0, 4), chunk_rng(key, 1, 3), chunk_rng(run_key("k2"), 0, 3)):
        assert not np.array_equal(a, other.integers(0, 2**62, 8))
    assert run_key("k") == run_key("k") and run_key(None) != run_key(None)


def _epsilon(name: str, index: EmbeddingIndex) -> float:
    cls = get(name)
    low, _ = cls.feasible_epsilon(cls.Params(), index.geometry)
    return 10.0 if low == 0 else 1.2 * low


@pytest.mark.parametrize("name", sorted(available()))
def test_seeded_runs_reproduce_and_unseeded_runs_differ(name: str, glove_small: EmbeddingIndex) -> None:
    m = create(name, glove_small, _epsilon(name, glove_small), {})
    ids = np.tile(np.arange(200), 5)

    def run(seed: str | None) -> np.ndarray:
        key = run_key(seed)
        return np.concatenate([m.perturb_ids(ids, chunk_rng(key, 0, c)) for c in range(2)])

    assert np.array_equal(run("repro"), run("repro"))
    a, b = run(None), run(None)
    assert not np.array_equal(a, b), f"{name}: two unseeded runs gave the same output"


def test_report_commits_to_the_seed_only_by_hash(tmp_path: Path, cache_root: Path, glove_small: EmbeddingIndex) -> None:
    env = {**os.environ, "PRIVTEXT_CACHE": str(cache_root)}
    src = tmp_path / "in.txt"
    src.write_text("the president said the market fell\n" * 20)
    outputs = {}
    for label, seed in (("s1", "pepper-77"), ("s2", "pepper-77"), ("u1", None), ("u2", None)):
        report = tmp_path / f"{label}.json"
        args = [sys.executable, "-m", "privtext", "perturb", str(src), "-o", str(tmp_path / f"{label}.txt"),
                "--format", "text", "--mechanism", "laplace", "--epsilon", "5", "--vocab-size", "2000",
                "--report", str(report), "-q"]
        if seed is not None:
            args += ["--seed", seed]
        subprocess.run(args, env=env, check=True, capture_output=True, timeout=300)
        outputs[label] = (tmp_path / f"{label}.txt").read_bytes()
        text = report.read_text()
        data = json.loads(text)["randomness"]
        if seed is None:
            assert data["seed_sha256"] is None and data["mode"] == "os-entropy"
        else:
            assert seed not in text
            assert data["seed_sha256"] == seed_commitment(seed) and data["mode"] == "seeded"
            assert "voids the privacy" in json.dumps(data)
    assert outputs["s1"] == outputs["s2"]
    assert outputs["u1"] != outputs["u2"]
