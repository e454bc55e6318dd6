"""Keyword -> concepts: names as phrases, inflections (a real lemmatiser), typos (rapidfuzz), synonyms files."""
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepindex.index.keywords import Vocabulary, max_edits, read_synonyms, tokens

pytestmark = pytest.mark.timeout(60)
SHIPPED = Path(__file__).resolve().parents[2] / "serving" / "vocabulary.yaml"
DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def digits():
    return Vocabulary.from_file(SHIPPED, DIGITS)


@pytest.mark.parametrize("query, concept", [("threes", "3"), ("Three", "3"), ("3s", "3"), ("3's", "3"),
                                            ("THREE", "3"), ("twos", "2"), ("Sevens", "7"), ("9", "9"),
                                            ("zeroes", "0"), ("eights", "8")])
def test_shipped_vocabulary_reads_inflections_and_case(digits, query, concept):
    p = digits.parse(query)
    assert p.concepts == [concept] and p.unmatched == [] and p.corrected == {}


@pytest.mark.parametrize("typo, word, concept", [("sevn", "seven", "7"), ("nien", "nine", "9"), ("thre", "three", "3"),
                                                 ("eigth", "eight", "8")])
def test_typos_are_corrected_and_reported(digits, typo, word, concept):
    p = digits.parse(f"{typo} and 1")
    assert p.concepts == [concept, "1"]
    assert p.corrected == {typo: word} and p.matched[typo] == concept and p.unmatched == []


def test_uncertain_words_are_suggested_not_guessed(digits):
    # "tree" is one edit from both "three" and "tres": a tie, so no guess, a "did you mean".
    p = digits.parse("tree fiv banana")
    assert p.concepts == [] and p.corrected == {}
    assert p.unmatched == ["tree", "fiv", "banana"]
    assert "three" in p.suggestions["tree"] and p.suggestions["fiv"][0] == "five"
    assert "banana" not in p.suggestions  # nothing close: no noise
    # Numbers and words under four letters are never corrected: one edit changes them too much.
    assert digits.parse("33").unmatched == ["33"] and max_edits("33") == 0 and max_edits("fiv") == 0


def test_stopwords_are_skipped_in_any_inflection(digits):
    p = digits.parse("Pictures with a digit and the numbers 4")
    assert p.concepts == ["4"] and p.unmatched == []


def test_names_with_underscores_hyphens_and_many_words_reach_their_concept():
    v = Vocabulary(["aquarium_fish", "maple_tree", "great-white_shark_fin", "red_eyed_tree_frog_on_leaf", "t-shirt",
                    "bird_of_prey"], stopwords=["of", "on", "the"])
    assert v.parse("aquarium_fish").concepts == ["aquarium_fish"]
    assert v.parse("Aquarium Fishes").concepts == ["aquarium_fish"]
    assert v.parse("great white shark fin").concepts == ["great-white_shark_fin"]  # four words
    assert v.parse("Great-White Shark Fins").concepts == ["great-white_shark_fin"]
    assert v.parse("red eyed tree frogs on leaves").concepts == ["red_eyed_tree_frog_on_leaf"]  # six words
    assert v.parse("T-shirts").concepts == ["t-shirt"]
    assert v.parse("birds of prey").concepts == ["bird_of_prey"]  # a stopword inside a name still counts
    p = v.parse("the maple trees with an aquarum fish")
    assert p.concepts == ["maple_tree", "aquarium_fish"] and p.corrected == {"aquarum": "aquarium"}
    assert p.unmatched == ["with", "an"]
    # A word of a longer name alone is not the concept, but it is suggested.
    p = v.parse("fish")
    assert p.concepts == [] and p.unmatched == ["fish"] and p.suggestions["fish"] == ["aquarium fish"]
    # A correction that leads to no match is not reported as one.
    p = v.parse("tshirt")
    assert p.corrected == {} and p.unmatched == ["tshirt"] and "t shirt" in p.suggestions["tshirt"]


def test_words_with_two_lemmas_meet_whichever_came_first():
    # "leaves" lemmatises to leave and leaf; "leaf" to leaf: both names stay reachable, both ways.
    v = Vocabulary(["autumn_leaves", "leaf"])
    assert v.parse("autumn leaf").concepts == ["autumn_leaves"]
    assert v.parse("autumn leaves").concepts == ["autumn_leaves"]
    assert v.parse("leaf").concepts == ["leaf"] and v.parse("leaves").concepts == ["leaf"]


@pytest.mark.parametrize("names", [["sunglass", "sunglasses"], ["sunglasses", "sunglass"], ["dog", "dogs"],
                                   ["glasses", "glass"], ["leaf", "leaves"]])
def test_names_that_share_a_lemma_each_reach_themselves_as_written(names):
    """Both are ImageNet classes ("sunglass", "sunglasses"): the second used to be unreachable, even typed
    exactly, as its lemma was the first's.  Each name reaches itself; an inflection of neither reaches the
    first by its lemma, as before."""
    v = Vocabulary(names)
    for name in names:
        assert v.parse(name).concepts == [name] and v.parse(name.upper()).concepts == [name]
    assert v.parse(f"{names[1]} and {names[0]}").concepts == [names[1], names[0]]


_word = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=9)


@settings(max_examples=60, deadline=None)
@given(st.lists(_word, min_size=1, max_size=6), st.sampled_from(["_", "-", " "]), st.booleans())
def test_any_concept_name_reaches_itself(words, sep, upper):
    name = sep.join(words)
    v = Vocabulary(["other_thing", name])
    query = " ".join(words).upper() if upper else name
    assert v.parse(query).concepts == [name]


def test_synonyms_files_merge_and_own_names_win(tmp_path):
    a = tmp_path / "service.yaml"
    a.write_text('concepts:\n  "3": [three]\n  "7": [seven]\nstopwords: [with]\n')
    b = tmp_path / "collection.yaml"
    b.write_text('concepts:\n  "3": [drei, "lucky charm"]\n  "7": ["3"]\nstopwords: [und]\n')  # "3" is 3's own name
    v = Vocabulary.from_files([a, b], DIGITS)
    p = v.parse("drei und seven with lucky charms 3")
    assert p.concepts == ["3", "7"] and p.unmatched == []
    assert p.matched == {"drei": "3", "seven": "7", "lucky charms": "3", "3": "3"}
    assert Vocabulary.from_file(None, DIGITS).parse("seven").concepts == []  # names alone


@pytest.mark.parametrize("text, field", [("concepts: [1, 2]\n", "must hold"),
                                         ('concepts:\n  "3": three\n', "concepts.3"),
                                         ("stopwords: a\n", "stopwords"), ("concept: {}\n", "unknown key"),
                                         ("concepts: {a: [b}\n", "not valid YAML")])
def test_bad_synonyms_files_name_the_field(tmp_path, text, field):
    f = tmp_path / "v.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=field):
        read_synonyms(f)
    with pytest.raises(FileNotFoundError, match="vocabulary"):
        read_synonyms(tmp_path / "none.yaml")


def test_tokens():
    assert tokens("Aquarium_Fish, t-shirt's 3s don't") == ["aquarium", "fish", "t", "shirt", "3s", "don't"]
    # As phones type them: a typographic apostrophe, full-width letters (NFKC).
    assert tokens("t-shirt\u2019s don\u2019t") == ["t", "shirt", "don't"]
    assert tokens("\uff24\uff4f\uff47 \uff13") == ["dog", "3"]
    v = Vocabulary(["cat_toy", "dog"])
    assert v.parse("cat\u2019s toy").concepts == ["cat_toy"] and v.parse("\uff24\uff4f\uff47").concepts == ["dog"]
