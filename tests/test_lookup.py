"""PackedVocabulary must answer exactly what the dictionary answers, for every word."""

from __future__ import annotations

import numpy as np
import pytest

from privtext.lookup import PACKED_CHARS, PackedVocabulary


def _look_up_all(vocabulary: PackedVocabulary, words: list[str]) -> np.ndarray:
    text = " ".join(words) + " " + " " * PACKED_CHARS
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    starts = np.cumsum(lengths + 1) - lengths - 1
    return vocabulary.look_up(cps, starts, lengths, text)


def _oracle(mapping: dict[str, int], words: list[str]) -> np.ndarray:
    return np.array([mapping.get(w, -1) for w in words], dtype=np.int64)


ADVERSARIAL_KEYS = [
    "a", "ab", "abcdefgh", "abcdefghi", "abcdefghijklmnop", "abcdefghijklmnopq",
    "café", "naïve", "ÿ", "straße", "ǆ", "слово", "日本語", "x" * 40, "é" * 16, "é" * 17,
]
ADVERSARIAL_QUERIES = [
    *ADVERSARIAL_KEYS,
    "abc", "abcdefg", "abcdefghij", "abcdefghijklmno", "abcdefghijklmnopqr", "abcdefghijklmnopz",
    "cafe", "cafè", "naive", "ÿÿ", "strasse", "слов", "日本", "x" * 39, "x" * 41, "é" * 15,
    "a\u0301", "b", "zz",
]


def test_adversarial_words_match_the_dictionary() -> None:
    mapping = {w: i * 7 for i, w in enumerate(ADVERSARIAL_KEYS)}
    vocabulary = PackedVocabulary.from_mapping(mapping)
    np.testing.assert_array_equal(_look_up_all(vocabulary, ADVERSARIAL_QUERIES),
                                  _oracle(mapping, ADVERSARIAL_QUERIES))


def test_keys_with_a_nul_or_a_space_never_match_a_word() -> None:
    # "a\x00" would pack to the same bytes as "a": it is kept out of the table, so "a" is OOV.
    mapping = {"a\x00": 1, "b c": 2, "d": 3}
    vocabulary = PackedVocabulary.from_mapping(mapping)
    np.testing.assert_array_equal(_look_up_all(vocabulary, ["a", "b", "c", "d"]), [-1, -1, -1, 3])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_vocabularies_with_long_probe_chains(seed: int) -> None:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdeéß")  # few letters: many words share prefixes and lengths
    def word() -> str:
        return "".join(rng.choice(alphabet, size=int(rng.integers(1, 20))))
    keys = sorted({word() for _ in range(3000)})
    mapping = {w: i for i, w in enumerate(keys)}
    vocabulary = PackedVocabulary.from_mapping(mapping)
    queries = [*keys, *(word() for _ in range(5000))]
    rng.shuffle(queries)
    np.testing.assert_array_equal(_look_up_all(vocabulary, queries), _oracle(mapping, queries))


def test_the_real_vocabulary_matches_the_dictionary(glove_small) -> None:  # type: ignore[no-untyped-def]
    mapping = glove_small.word_to_id
    vocabulary = PackedVocabulary.from_mapping(mapping)
    words = list(mapping)
    queries = [*words, *(w[:-1] for w in words if len(w) > 1), *(w + "s" for w in words)]
    np.testing.assert_array_equal(_look_up_all(vocabulary, queries), _oracle(mapping, queries))


def test_a_key_given_twice_keeps_its_first_id() -> None:
    # Many copies of the same few keys fight for the same slots: the earliest entry must win,
    # for packed keys and for the long ones kept as strings alike.
    keys = ["alpha", "beta", "x" * 30]
    first = (keys * 50, np.arange(150) + 1000)
    second = (keys * 50, np.arange(150))
    vocabulary = PackedVocabulary.build(first, second)[0]
    np.testing.assert_array_equal(_look_up_all(vocabulary, [*keys, "gamma"]), [1000, 1001, 1002, -1])


def test_the_text_path_table_answers_like_word_to_id(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.mechanisms import create
    from privtext.text import TextPerturber

    perturber = TextPerturber(glove_small, create("gumbel", glove_small, 500.0, {}))
    mapping = glove_small.word_to_id
    queries = [*mapping, "zzzznotaword"]
    np.testing.assert_array_equal(_look_up_all(perturber._packed(), queries), _oracle(mapping, queries))


def test_a_code_point_above_255_never_packs_to_its_low_byte() -> None:
    # Packing keeps one byte per code point: š (U+0161) would pack as "a" and Ţ (U+0162) as "b",
    # and ĀĀ as "\x00\x00" (the padding). Such words must go to the dictionary, wherever in the
    # chunk (first, last, between Latin-1 words) and wherever in the word the wide code point is.
    mapping = {"a": 1, "b": 2, "ab": 3, "ša": 4, "xyz": 5}
    vocabulary = PackedVocabulary.from_mapping(mapping)
    queries = ["\u0161", "a", "\u0162", "a\u0162", "\u0161a", "xyz", "\u0100\u0100", "b", "x\u0179z"]
    np.testing.assert_array_equal(_look_up_all(vocabulary, queries), _oracle(mapping, queries))
    np.testing.assert_array_equal(_look_up_all(vocabulary, queries[::-1]), _oracle(mapping, queries[::-1]))
