import numpy as np
import pytest

from privtext.mechanisms import create
from privtext.text import OovPolicy, TextPerturber, restore_case, tokenize


@pytest.mark.parametrize(
    "text",
    ["", "Hello, world!", "  spaced\tout\n", "naïve café — déjà vu", "e-mail: a_b@c.d (x2) 3.14", "日本語 text"],
)
def test_tokenize_round_trips_exactly(text: str) -> None:
    parts = tokenize(text)
    assert "".join(parts) == text
    assert all(w.isalnum() for w in parts[1::2])


def test_restore_case_patterns() -> None:
    assert restore_case("house", "home") == "home"
    assert restore_case("House", "home") == "Home"
    assert restore_case("HOUSE", "home") == "HOME"
    assert restore_case("I", "we") == "We"
    assert restore_case("iPhone", "phone") == "phone"


def _perturber(index, oov: str, eps: float = 1e6) -> TextPerturber:  # type: ignore[no-untyped-def]
    # laplace at a huge ε returns each word itself, which makes the text plumbing visible
    return TextPerturber(index, create("laplace", index, eps, {}), oov=oov, mask_token="[OOV]")


def test_punctuation_and_spacing_survive_and_case_is_restored(glove_small) -> None:  # type: ignore[no-untyped-def]
    texts = ["The  man, said THE Day!\n", "World?"]
    out, counters = _perturber(glove_small, "mask").perturb_texts(texts, np.random.default_rng(0))
    assert out == texts  # at ε = 1e6 every word maps to itself, so the text round-trips
    assert counters.word_tokens == 6 and counters.perturbed == 6 and counters.unchanged == 6
    assert counters.other_tokens == 3  # ",", "!", "?"


@pytest.mark.parametrize(("policy", "expected"), [("mask", "the [OOV] was"), ("drop", "the  was")])
def test_oov_policies_never_leak_the_word(glove_small, policy: str, expected: str) -> None:  # type: ignore[no-untyped-def]
    out, counters = _perturber(glove_small, policy).perturb_texts(["the qzxvbnm was"], np.random.default_rng(0))
    assert out == [expected]
    assert counters.oov == 1


def test_oov_keep_passes_through(glove_small) -> None:  # type: ignore[no-untyped-def]
    out, counters = _perturber(glove_small, OovPolicy.KEEP).perturb_texts(["the qzxvbnm was"], np.random.default_rng(0))
    assert out == ["the qzxvbnm was"] and counters.oov == 1


def test_per_document_histogram(glove_small) -> None:  # type: ignore[no-untyped-def]
    _, counters = _perturber(glove_small, "mask").perturb_texts(
        ["the man", "", "a new day qzxvbnm", "the"], np.random.default_rng(0)
    )
    # documents with 2, 0, 3 (the OOV word is not perturbed) and 1 perturbed tokens
    assert counters.doc_hist.tolist() == [1, 1, 1, 1]
