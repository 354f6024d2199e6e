import unicodedata

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


# --- Unicode words, byte preservation and an oracle for the columnar chunk path -----------------

_EXTENDER_CATEGORIES = ("Mn", "Mc", "Me")


def reference_tokenize(text: str) -> list[str]:
    """The word definition, one character at a time: a letter or digit, then any letters, digits,
    combining marks and ZWNJ/ZWJ. Slow and obvious on purpose: the oracle for the fast path."""

    def continues(ch: str) -> bool:
        return ch.isalnum() or ch in "\u200c\u200d" or unicodedata.category(ch) in _EXTENDER_CATEGORIES

    parts: list[str] = []
    gap_start = i = 0
    while i < len(text):
        if text[i].isalnum():
            j = i + 1
            while j < len(text) and continues(text[j]):
                j += 1
            parts += [text[gap_start:i], text[i:j]]
            gap_start = i = j
        else:
            i += 1
    parts.append(text[gap_start:])
    return parts


def _nfc_table(index) -> dict[str, int]:  # type: ignore[no-untyped-def]
    table = dict(index.word_to_id)
    for word, i in list(table.items()):
        table.setdefault(unicodedata.normalize("NFC", word), i)
    return table


def reference_perturb(perturber: TextPerturber, index, texts: list[str], rng: np.random.Generator):  # type: ignore[no-untyped-def]
    """What perturb_texts must return, computed word by word in plain Python."""
    table = _nfc_table(index)
    docs = [reference_tokenize(t) for t in texts]
    words = [w for parts in docs for w in parts[1::2]]
    ids = np.array([table.get(unicodedata.normalize("NFC", w.lower()), -1) for w in words], dtype=np.int64)
    known = ids >= 0
    out_ids = ids.copy()
    out_ids[known] = perturber.mechanism.perturb_ids(ids[known], rng)
    replaced = []
    for word, i, o in zip(words, ids.tolist(), out_ids.tolist()):
        if i < 0:
            replaced.append({"mask": "[OOV]", "drop": "", "keep": word}[perturber.oov.value])
        elif word != word.lower():
            replaced.append(restore_case(word, index.words[o]))
        else:
            replaced.append(index.words[o])
    out, pos, per_doc = [], 0, []
    for parts in docs:
        n = len(parts) // 2
        parts[1::2] = replaced[pos : pos + n]
        per_doc.append(int(known[pos : pos + n].sum()))
        pos += n
        out.append("".join(parts))
    gaps = [g for parts in docs for g in parts[::2]]
    counts = {
        "records": len(texts), "word_tokens": len(words), "other_tokens": len(" ".join(gaps).split()),
        "perturbed": int(known.sum()), "unchanged": int((out_ids[known] == ids[known]).sum()),
        "oov": int((~known).sum()), "doc_hist": np.bincount(np.array(per_doc, dtype=np.int64), minlength=1).tolist(),
    }
    return out, counts


def _counts(c) -> dict:  # type: ignore[no-untyped-def]
    names = ("records", "word_tokens", "other_tokens", "perturbed", "unchanged", "oov")
    return {**{n: getattr(c, n) for n in names}, "doc_hist": c.doc_hist.tolist()}


# Lower-case NFC vocabulary entries (plus one decomposed) that the adversarial pieces reach.
UNICODE_VOCAB = [
    "the", "a", "day", "man", "1990", "café", "nai\u0308ve", "straße", "οδος", "i\u0307stanbul",
    "हिन्दी", "क्षत्रिय", "می\u200cخواهم", "日本語", "ǆungla", "x\u0345y", "one", "two", "three", "four",
]
PIECES = [
    # words in several cases and normal forms
    "the", "The", "THE", "tHe", "Day", "DAY", "a", "A", "1990", "café", "Cafe\u0301", "CAFÉ",
    "naïve", "nai\u0308ve", "NAÏVE", "straße", "Straße", "STRASSE", "ΟΔΟΣ", "Οδος", "İstanbul",
    "İSTANBUL", "हिन्दी", "क्षत्रिय", "क\u094d\u200dष", "می\u200cخواهم", "日本語", "ǅungla", "ǄUNGLA",
    "X\u0345Y", "x\u0345y", "Ⓐbc", "½", "x²", "one", "Two", "THREE", "four",
    # out of vocabulary, including words whose pieces would be in vocabulary
    "qzxvbnm", "Qzx", "theday", "the\u0301", "a\u200db", "caf\u0301e",
    # between words
    " ", "  ", "\t", "\r\n", "\n", "\u00a0", "\u2028", "\x1c", "\x00", ",", ".", "!", "_", "__", "-",
    "\u0301", "\u200d", "\u200c", "👍", "👍🏽", "👩\u200d👩\u200d👧", "1\ufe0f\u20e3", "❤\ufe0f", "—", "«", "»",
    "'", "\u200b", "\ufeff",
]


@pytest.fixture(scope="module")
def unicode_index(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from conftest import make_index

    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(len(UNICODE_VOCAB), 4)) * 2.0
    return make_index(tmp_path_factory.mktemp("unicode") / "idx", vectors, list(UNICODE_VOCAB), neighbors=8)


def _random_texts(rng: np.random.Generator, n: int) -> list[str]:
    texts = []
    for _ in range(n):
        k = int(rng.integers(0, 14))
        texts.append("".join(PIECES[i] for i in rng.integers(0, len(PIECES), k)))
    return texts


@pytest.mark.parametrize("policy", ["mask", "drop", "keep"])
@pytest.mark.parametrize("seed", range(6))
def test_chunk_path_equals_word_by_word_reference(unicode_index, policy: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    # ε = 1 on a 20-word vocabulary: replacements differ from the input in word, length and case
    perturber = TextPerturber(unicode_index, create("laplace", unicode_index, 1.0, {}), oov=policy)
    texts = _random_texts(np.random.default_rng(seed), 300)
    out, counters = perturber.perturb_texts(texts, np.random.default_rng(100 + seed))
    expected, counts = reference_perturb(perturber, unicode_index, texts, np.random.default_rng(100 + seed))
    assert out == expected
    assert _counts(counters) == counts
    assert counts["perturbed"] > 100 and counts["oov"] > 50  # the inputs exercise both paths


def test_chunk_path_identity_keeps_every_byte(unicode_index) -> None:  # type: ignore[no-untyped-def]
    # At ε = 1e6 every word maps to itself; with OOV kept the output must be the input exactly
    # wherever case restoration is exact (lower and Title words of the vocabulary, all gaps).
    perturber = TextPerturber(unicode_index, create("laplace", unicode_index, 1e6, {}), oov="keep")
    texts = _random_texts(np.random.default_rng(11), 300)
    out, _ = perturber.perturb_texts(texts, np.random.default_rng(0))
    table = _nfc_table(unicode_index)

    def round_trips(word: str) -> bool:  # OOV (kept), or the vocabulary spells it this way
        key = unicodedata.normalize("NFC", word.lower())
        return key not in table or restore_case(word, unicode_index.words[table[key]]) == word

    exact = [i for i, t in enumerate(texts) if all(map(round_trips, tokenize(t)[1::2]))]
    assert len(exact) > 50
    assert [out[i] for i in exact] == [texts[i] for i in exact]
    for text, result in zip(texts, out):
        assert tokenize(result)[::2] == tokenize(text)[::2]  # the bytes outside words, unchanged


@pytest.mark.parametrize("seed", range(3))
def test_tokenize_equals_reference_and_regex(seed: int) -> None:
    import re

    from privtext.embeddings import is_word_like, word_pattern

    split = re.compile(f"({word_pattern()})").split
    for text in _random_texts(np.random.default_rng(seed), 400):
        parts = tokenize(text)
        assert parts == reference_tokenize(text) == split(text)
        assert "".join(parts) == text
        assert all(is_word_like(w) for w in parts[1::2])
        assert not any(is_word_like(g) for g in parts[::2] if g)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("Cafe\u0301 ok", ["Cafe\u0301", "ok"]),  # decomposed é stays inside its word
        ("हिन्दी में", ["हिन्दी", "में"]),  # vowel signs (Mc), virama and anusvara (Mn)
        ("می\u200cخواهم", ["می\u200cخواهم"]),  # ZWNJ inside a Persian word
        ("\u0301a \u0301", ["a"]),  # a mark after a non-word character is not a word
        ("a_b", ["a", "b"]),
        ("1\ufe0f\u20e3 x", ["1\ufe0f\u20e3", "x"]),
        ("👩\u200d👩\u200d👧!", []),
        ("x\r\ny", ["x", "y"]),
    ],
)
def test_words_are_whole_in_any_script(text: str, words: list[str]) -> None:
    assert tokenize(text)[1::2] == words


def test_decomposed_and_foreign_oov_words_are_masked_whole(unicode_index) -> None:  # type: ignore[no-untyped-def]
    perturber = TextPerturber(unicode_index, create("laplace", unicode_index, 1e6, {}), oov="mask")
    texts = ["the caf\u0301e, हिन्दीं and 日本 \u0301!", "Naı\u0308ve"]
    out, counters = perturber.perturb_texts(texts, np.random.default_rng(0))
    assert out == ["the [OOV], [OOV] [OOV] [OOV] \u0301!", "[OOV]"]
    assert counters.oov == 5 and counters.perturbed == 1


def test_lookup_is_nfc_and_case_insensitive(unicode_index) -> None:  # type: ignore[no-untyped-def]
    perturber = TextPerturber(unicode_index, create("laplace", unicode_index, 1e6, {}), oov="mask")
    texts = ["Cafe\u0301 café CAFÉ naïve nai\u0308ve Straße İstanbul ΟΔΟΣ"]
    out, counters = perturber.perturb_texts(texts, np.random.default_rng(0))
    assert counters.oov == 0 and counters.perturbed == 8
    # replacements are the vocabulary's spelling in the original's case pattern
    assert out == ["Café café CAFÉ nai\u0308ve nai\u0308ve Straße I\u0307stanbul ΟΔΟΣ"]


def test_case_patterns_on_real_vocabulary(glove_small) -> None:  # type: ignore[no-untyped-def]
    perturber = _perturber(glove_small, "mask")
    texts = ["The MAN said: THE day, tHe Day. I a A"]
    out, _ = perturber.perturb_texts(texts, np.random.default_rng(0))
    # lower, Title and UPPER are kept; a mixed pattern (tHe) becomes lower case; one capital
    # letter (I, A) reads as Title
    assert out == ["The MAN said: THE day, the Day. I a A"]


def test_empty_inputs(glove_small) -> None:  # type: ignore[no-untyped-def]
    perturber = _perturber(glove_small, "mask")
    out, counters = perturber.perturb_texts([], np.random.default_rng(0))
    assert out == [] and counters.records == 0 and counters.doc_hist.tolist() == [0]
    out, counters = perturber.perturb_texts(["", " ,\n", ""], np.random.default_rng(0))
    assert out == ["", " ,\n", ""] and counters.other_tokens == 1 and counters.doc_hist.tolist() == [3]


def test_lone_surrogates_from_library_callers_pass_between_words(glove_small) -> None:  # type: ignore[no-untyped-def]
    # The codecs reject them; a library caller's string still round-trips outside words.
    out, counters = _perturber(glove_small, "mask").perturb_texts(["the\ud800man"], np.random.default_rng(0))
    assert out == ["the\ud800man"] and counters.word_tokens == 2


@pytest.mark.parametrize("block", [1, 3, 64, 1 << 20])
def test_gather_runs_in_blocks(block: int) -> None:
    from privtext.text import _gather_runs

    rng = np.random.default_rng(block)
    base = rng.integers(0, 1000, 500).astype(np.uint32)
    starts = rng.integers(0, 450, 200)
    lengths = rng.integers(0, 50, 200)  # zero-length runs (dropped words) included
    expected = np.concatenate([base[s : s + n] for s, n in zip(starts, lengths)])
    assert np.array_equal(_gather_runs(base, starts, lengths, block=block), expected)


def test_word_likeness_is_what_the_tokenizer_reads_as_one_word() -> None:
    from privtext.embeddings import is_word_like

    rng = np.random.default_rng(5)
    candidates = [*UNICODE_VOCAB, *PIECES, "", "a b", "_a", "a_", "\u0301a", "a\u0301", "a\u200d", "\u200da"]
    candidates += ["".join(PIECES[i] for i in rng.integers(0, len(PIECES), 2)) for _ in range(2000)]
    for text in candidates:
        assert is_word_like(text) == (tokenize(text) == ["", text, ""]), text


def test_threads_sharing_a_perturber_get_their_own_results(glove_small) -> None:  # type: ignore[no-untyped-def]
    # Engines and library users share one perturber between threads; each chunk's output must be
    # what a lone call gives (no scratch space shared between concurrent chunks).
    from concurrent.futures import ThreadPoolExecutor

    perturber = TextPerturber(glove_small, create("gumbel", glove_small, 300.0, {}), oov="mask")
    words = glove_small.words[:500]
    rng = np.random.default_rng(3)
    chunks = [[" ".join(rng.choice(words, int(rng.integers(50, 400)))).title() for _ in range(40)]
              for _ in range(16)]
    expected = [perturber.perturb_texts(c, np.random.default_rng(i))[0] for i, c in enumerate(chunks)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            got = list(pool.map(lambda ic: perturber.perturb_texts(ic[1], np.random.default_rng(ic[0]))[0],
                                enumerate(chunks)))
            assert got == expected


def test_long_documents_are_perturbed_in_pieces_without_cutting_words(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.text import iter_pieces

    rng = np.random.default_rng(5)
    words = ["the", "man", "said", "World", "qzxvbnm", "day"]
    long_doc = " ".join(rng.choice(words, size=3000).tolist()) + "!\n"
    texts = ["a short one", long_doc, "", "the end"]
    pieces = list(iter_pieces(long_doc, 200))
    assert "".join(pieces) == long_doc and len(pieces) > 10
    assert all(p[:1].isspace() for p in pieces[1:])  # every cut lies just before whitespace

    perturber = _perturber(glove_small, "mask")
    whole, whole_counts = perturber.perturb_texts(texts, np.random.default_rng(0))
    split, split_counts = perturber.perturb_documents(texts, np.random.default_rng(0), long_chars=500)
    assert split == whole  # at ε = 1e6 every word maps to itself: identical text either way
    assert _counts(split_counts) == _counts(whole_counts)  # one document each, same histogram


@pytest.mark.parametrize("words", [
    ["the", "Paris", "straße", "ǆemal", "éclair", "ﬁne", "x"],  # every first letter keeps its length
    ["ßa", "ŉx", "straße", "the", "ﬁne"],  # first letters that grow when upper-cased
])
def test_vocabulary_spellings_match_apply_case(words: list[str]) -> None:
    from privtext.text import _AS_IS, _TITLE, _UPPER_ALL, _Vocabulary, apply_case

    vocab = _Vocabulary(*_Vocabulary.spell(words))
    text = "".join(map(chr, vocab.cps.tolist()))
    for pattern in (_AS_IS, _TITLE, _UPPER_ALL):
        for i, word in enumerate(words):
            start, length = vocab.offsets[pattern, i], vocab.lengths[pattern, i]
            assert text[start : start + length] == apply_case(pattern, word)


@pytest.mark.parametrize("policy", ["mask", "drop", "keep"])
def test_spans_in_one_buffer_equal_the_documents_cut_out(unicode_index, policy: str) -> None:  # type: ignore[no-untyped-def]
    # perturb_spans must draw the same noise and write the same words as perturb_documents on
    # the span texts; everything between spans (one code point or more) stays as it was.
    perturber = TextPerturber(unicode_index, create("laplace", unicode_index, 1.0, {}), oov=policy)
    rng = np.random.default_rng(3)
    for trial in range(20):
        docs = _random_texts(rng, int(rng.integers(1, 40)))
        gaps = [t or "\x00" for t in _random_texts(rng, len(docs) + 1)]  # a gap is never empty
        gaps[0] = gaps[0] if trial % 2 else ""  # a span may start the buffer
        text, starts, ends = gaps[0], [], []
        for doc, gap in zip(docs, gaps[1:]):
            starts.append(len(text))
            text += doc
            ends.append(len(text))
            text += gap
        expected, counts = perturber.perturb_documents(docs, np.random.default_rng(trial))
        new, new_starts, new_ends, counters = perturber.perturb_spans(
            text, np.array(starts), np.array(ends), np.random.default_rng(trial))
        assert [new[a:b] for a, b in zip(new_starts, new_ends)] == expected
        between = [new[a:b] for a, b in zip([0, *new_ends], [*new_starts, len(new)])]
        assert between == [gaps[0], *gaps[1:]]
        assert _counts(counters) == _counts(counts)


def test_spans_must_be_ordered_with_gaps(glove_small) -> None:  # type: ignore[no-untyped-def]
    perturber = _perturber(glove_small, "mask")
    for starts, ends in (([0, 3], [3, 5]), ([2, 0], [3, 1]), ([0], [9]), ([1], [0])):
        with pytest.raises(ValueError, match="spans must be"):
            perturber.perturb_spans("the cat", np.array(starts), np.array(ends), np.random.default_rng(0))


def test_a_long_span_is_perturbed_in_pieces_like_a_long_document(glove_small) -> None:  # type: ignore[no-untyped-def]
    from privtext.text import LONG_DOCUMENT_CHARS

    perturber = TextPerturber(glove_small, create("gumbel", glove_small, 300.0, {}))
    rng = np.random.default_rng(8)
    words = ["the", "Man", "said", "WORLD", "qzxvbnm", "day", "of"]
    long_doc = " ".join(rng.choice(words, size=LONG_DOCUMENT_CHARS // 3).tolist())
    assert len(long_doc) > LONG_DOCUMENT_CHARS
    docs = ["a short one", long_doc, "", "the end"]
    text = "[" + "][".join(docs) + "]"
    starts = np.cumsum([1] + [len(d) + 2 for d in docs[:-1]])
    ends = starts + [len(d) for d in docs]
    expected, counts = perturber.perturb_documents(docs, np.random.default_rng(1))
    new, new_starts, new_ends, counters = perturber.perturb_spans(text, starts, ends, np.random.default_rng(1))
    assert new == "[" + "][".join(expected) + "]"
    assert [new[a:b] for a, b in zip(new_starts, new_ends)] == expected
    assert _counts(counters) == _counts(counts)
