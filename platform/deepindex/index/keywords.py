"""Keyword search: words -> concepts through a vocabulary with synonyms -> ranked items.

The vocabulary is derived from the concept names: ``aquarium_fish`` is the phrase "aquarium
fish" (underscores and hyphens are spaces), a name of any length is a phrase of that length.
A synonyms file (one per collection, or several merged) adds words and phrases::

    concepts:            # concept name -> words and phrases that mean it
      "3": [three, trois]
    stopwords: [and, with, a, the]

Matching (``Vocabulary.parse``):

1. tokens: letters and digits; underscores, hyphens and punctuation split; a trailing ``'s``
   or ``'`` is a clitic, dropped (as the Penn Treebank tokeniser splits it off);
2. case-insensitive, and inflection-insensitive: every word of the vocabulary and of the
   query is reduced to its noun lemmas by ``lemminflect`` (a dictionary-backed lemmatiser), so
   ``threes``, ``Three`` and ``3s`` all read as ``three`` / ``3``; a word with two lemmas
   (``leaves``: leave, leaf) matches a vocabulary word through either.  A stemmer (Snowball)
   was the other candidate; it keeps ``twos`` and ``3s`` as they are;
3. typos: a word the vocabulary does not know is corrected to the vocabulary word at the
   smallest edit distance (optimal string alignment, from ``rapidfuzz``) when that distance
   is at most 1 for words of 4-7 letters and 2 from 8 letters, and that word is the only one
   at that distance (``sevn`` -> ``seven``).  Shorter words and numbers are never corrected:
   one edit changes them too much.  Corrections are reported in ``corrected``;
4. phrases, longest first, over the (corrected) lemmas; stopwords that are not part of a
   phrase are skipped; other words are reported in ``unmatched`` with up to three "did you
   mean" phrases each (``suggestions``, by ``rapidfuzz``'s weighted ratio >= 75, so a word of
   a longer name suggests it: ``fish`` -> ``aquarium fish``).

Scoring (``rank``): with ``p_i(c)`` the presence probability of concept ``c`` in item ``i``,
- ``all`` (default): ``score = prod_c p_i(c)``, the probability that every query concept is
  present if concepts are independent; computed as a sum of logs so many concepts do not
  underflow;
- ``any``: ``score = 1 - prod_c (1 - p_i(c))`` (noisy-or), the probability that at least one is.

A model of exclusive classes (softmax: an image is one of them) makes the concepts disjoint, not
independent: ``any`` is then ``sum_c p_i(c)``, exactly the probability that the image is one of
them, and ``all`` of two or more classes is refused (no image is two classes; its product would
rank the images the model is least sure of first).
"""
from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)*", re.UNICODE)
_CLITIC = re.compile(r"'s?$")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u02bc": "'"})  # right single quotation mark, modifier letter
SUGGEST_MIN_SCORE = 75.0  # rapidfuzz WRatio (0-100) for a "did you mean" phrase
SUGGEST_MAX = 3
# What a search's score is, per mode, for people (the response's ``scoring``): independent concepts
# (a multi-label model's sigmoids), or exclusive classes (a softmax).
SCORING = {"all": "product of the query concepts' presence probabilities (all present, independence assumed)",
           "any": "1 - product of (1 - presence probability): noisy-or, at least one present"}
SCORING_EXCLUSIVE = {"all": "the class's probability (exclusive classes: an image is one of them)",
                     "any": "sum of the query classes' probabilities (exclusive classes: the image is one of them)"}


def max_edits(word: str) -> int:
    """Edits a typo may be away from a vocabulary word to be corrected (see the module doc)."""
    if word.isdigit() or len(word) < 4:
        return 0
    return 1 if len(word) < 8 else 2


@dataclass(frozen=True)
class ParsedQuery:
    concepts: list[str]  # distinct, in query order
    matched: dict[str, str]  # word/phrase as typed (lower case) -> concept
    unmatched: list[str]
    corrected: dict[str, str] = field(default_factory=dict)  # typed word -> vocabulary word it was read as
    suggestions: dict[str, list[str]] = field(default_factory=dict)  # unmatched word -> "did you mean" phrases


class Vocabulary:
    """Concept names (and synonyms) as lemmatised phrases; ``parse`` maps a query to concepts."""

    def __init__(self, concepts: list[str], synonyms: dict[str, list[str]] | None = None,
                 stopwords: list[str] | None = None, autocorrect: bool = True):
        self.concepts = list(concepts)
        self.autocorrect = autocorrect
        self.lookup: dict[tuple[str, ...], str] = {}  # lemma phrase -> concept
        # Phrase as written -> concept, looked up before the lemmas: two names that share a lemma
        # ("glass", "glasses"; both ImageNet classes: "sunglass", "sunglasses") each stay reachable
        # by their own spelling; the lemma still reaches the first of them.
        self.exact: dict[tuple[str, ...], str] = {}
        self.phrases: dict[str, str] = {}  # display phrase -> concept (for suggestions)
        # Own names first: a synonym never takes a concept's own name from it.
        entries = [(c, c) for c in self.concepts]
        entries += [(str(c), str(w)) for c, words in (synonyms or {}).items() if str(c) in self.concepts
                    for w in words or []]  # a vocabulary may cover more concepts than a given model has
        # A word can have several lemmas ("leaves": leave, leaf): a vocabulary word is keyed by its
        # first, and each of its lemmas is an alias of that key, so a query word reaches it by any.
        self._alias: dict[str, str] = {}
        for _, text in entries:
            for w in tokens(text):
                for alt in lemmas(w):
                    self._alias.setdefault(alt, lemmas(w)[0])
        for concept, text in entries:
            words = tokens(text)
            if not words:
                continue
            keyed = [self._key(w) for w in words]  # through the aliases, as a query word goes
            key = tuple(k for k in keyed if k is not None)
            if len(key) != len(keyed):
                continue  # not reached: every word of an entry was aliased above
            self.exact.setdefault(tuple(words), concept)
            if self.lookup.setdefault(key, concept) != concept:
                log.debug("vocabulary: %r already means %r, not %r", text, self.lookup[key], concept)
            self.phrases.setdefault(" ".join(words), concept)
        self.max_len = max((len(k) for k in self.lookup), default=1)
        self.stopwords = {w for s in (stopwords or []) for w in (s.lower(), *lemmas(s.lower()))}
        # Typo targets: every word of every phrase as written, mapped to its key.
        # Every vocabulary word -> its key (each was aliased above): what a typo is corrected to.
        self._choices: dict[str, str] = {w: k for text in self.phrases for w in text.split()
                                         if (k := self._key(w)) is not None}

    @classmethod
    def from_file(cls, path: str | Path | None, concepts: list[str]) -> Vocabulary:
        """The concept names plus the synonyms file at ``path`` (none: the names alone)."""
        return cls.from_files([path] if path is not None else [], concepts)

    @classmethod
    def from_files(cls, paths: Iterable[str | Path], concepts: list[str], autocorrect: bool = True) -> Vocabulary:
        """The concept names plus several synonyms files merged (e.g. the service's and a collection's)."""
        syn: dict[str, list[str]] = {}
        stop: list[str] = []
        for path in paths:
            s, sw = read_synonyms(path)
            for c, words in s.items():
                syn.setdefault(c, []).extend(words)
            stop += sw
        return cls(concepts, syn, stop, autocorrect)

    def parse(self, query: str) -> ParsedQuery:
        typed = tokens(query or "")
        keys = [self._key(t) for t in typed]
        corrected: dict[str, str] = {}
        if self.autocorrect:
            for i, t in enumerate(typed):
                if keys[i] is None and t not in self.stopwords and not self.stopwords.intersection(lemmas(t)):
                    fix = self._correct(t)
                    if fix is not None:
                        corrected[t] = fix
                        keys[i] = self._choices[fix]
        concepts: list[str] = []
        matched: dict[str, str] = {}
        unmatched: list[str] = []
        used: set[str] = set()  # typed words inside a matched phrase
        i = 0
        while i < len(typed):
            for n in range(min(self.max_len, len(typed) - i), 0, -1):  # longest phrase first
                key = tuple(k for k in keys[i : i + n] if k is not None)
                c = self.exact.get(tuple(typed[i : i + n])) or (self.lookup.get(key) if len(key) == n else None)
                if c is not None:
                    matched[" ".join(typed[i : i + n])] = c
                    used.update(typed[i : i + n])
                    if c not in concepts:
                        concepts.append(c)
                    i += n
                    break
            else:
                if (typed[i] not in self.stopwords and not self.stopwords.intersection(lemmas(typed[i]))
                        and typed[i] not in unmatched):
                    unmatched.append(typed[i])
                i += 1
        corrected = {w: fix for w, fix in corrected.items() if w in used}  # a fix that matched nothing is no fix
        suggestions = {w: s for w in unmatched if (s := self.suggest(w))}
        return ParsedQuery(concepts, matched, unmatched, corrected, suggestions)

    def suggest(self, word: str) -> list[str]:
        """Up to ``SUGGEST_MAX`` vocabulary phrases close to ``word``, best first."""
        from rapidfuzz import fuzz, process

        hits = process.extract(word, list(self.phrases), scorer=fuzz.WRatio, score_cutoff=SUGGEST_MIN_SCORE,
                               limit=SUGGEST_MAX)
        return [h[0] for h in hits]

    def _key(self, word: str) -> str | None:
        """The vocabulary key a typed word reaches through any of its lemmas, None if none."""
        return next((self._alias[x] for x in lemmas(word) if x in self._alias), None)

    def _correct(self, word: str) -> str | None:
        """The one vocabulary word within ``max_edits`` of the typed word or its lemma, else None."""
        from rapidfuzz import process
        from rapidfuzz.distance import OSA

        k = max_edits(word)
        if k == 0:
            return None
        best: dict[str, tuple[int, str]] = {}  # target lemma -> (distance, typed form)
        for probe in {word, lemmas(word)[0]}:
            for choice, dist, _ in process.extract(probe, list(self._choices), scorer=OSA.distance, score_cutoff=k,
                                                   limit=None):
                target = self._choices[choice]
                if target not in best or dist < best[target][0]:
                    best[target] = (int(dist), choice)
        if not best:
            return None
        d = min(v[0] for v in best.values())
        closest = [v[1] for v in best.values() if v[0] == d]
        return closest[0] if len(closest) == 1 else None  # a tie between two words: ask, do not guess


def tokens(text: str) -> list[str]:
    """Lower-case words of ``text``: underscores, hyphens and punctuation split; clitic ``'s`` dropped.

    The text is NFKC-normalised first (full-width ``Ｄｏｇ`` is ``dog``), and a typographic apostrophe
    is the ASCII one (``cat’s`` is ``cat's``, as phones and word processors type it)."""
    out = []
    for t in _TOKEN.findall(unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()):
        t = _CLITIC.sub("", t)
        if t:
            out.append(t)
    return out


@functools.lru_cache(maxsize=65536)
def lemmas(word: str) -> tuple[str, ...]:
    """The noun lemmas of a lower-case word (``threes`` -> three, ``3s`` -> 3, ``leaves`` -> leave, leaf)."""
    from lemminflect import getLemma

    found = tuple(getLemma(word, upos="NOUN"))
    return found if found else (word,)


def read_synonyms(path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """A synonyms file -> ({concept: [words and phrases]}, stopwords); errors name the file and field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"vocabulary: no such file {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"vocabulary: {p} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("concepts", {}), dict):
        raise ValueError(f"vocabulary: {p} must hold 'concepts: {{concept: [synonyms]}}'")
    unknown = set(data) - {"concepts", "stopwords"}
    if unknown:
        raise ValueError(f"vocabulary: {p}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    syn: dict[str, list[str]] = {}
    for c, words in (data.get("concepts") or {}).items():
        if words is not None and not isinstance(words, list):
            raise ValueError(f"vocabulary: {p}: concepts.{c}: expected a list of words and phrases")
        syn[str(c)] = [str(w) for w in words or []]
    stop = data.get("stopwords") or []
    if not isinstance(stop, list):
        raise ValueError(f"vocabulary: {p}: stopwords: expected a list of words")
    return syn, [str(w) for w in stop]


def scores(probs: np.ndarray, concept_idx: list[int], mode: str = "all", exclusive: bool = False,
           names: list[str] | None = None) -> np.ndarray:
    """(N, K) probabilities -> (N,) scores for the query concepts (see the module doc); ``exclusive``:
    the probabilities are a softmax's, over classes an image is one of (``names``: the K concepts, for
    the refusal of ``all``)."""
    if exclusive and mode in SCORING:
        distinct = list(dict.fromkeys(concept_idx))
        if mode == "all" and len(distinct) > 1:
            which = ", ".join(names[j] for j in distinct) if names else f"{len(distinct)} classes"
            raise ValueError(f"mode=all: {which} are exclusive classes of this model (an image is one of them), "
                             f"so no image is all of them; mode=any finds images of any of them")
        return np.clip(probs[:, distinct].astype(np.float64).sum(axis=1), 0.0, 1.0)
    p = probs[:, concept_idx].astype(np.float64)  # (N, q)
    if mode == "all":
        return np.exp(np.log(np.clip(p, 1e-12, 1.0)).sum(axis=1))
    if mode == "any":
        return 1.0 - np.exp(np.log(np.clip(1.0 - p, 1e-12, 1.0)).sum(axis=1))
    raise ValueError(f"mode: expected 'all' or 'any', got {mode!r}")


def rank(probs: np.ndarray, concept_idx: list[int], k: int, mode: str = "all", exclusive: bool = False,
         names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and their scores, best first (ties broken by row for stable results)."""
    s = scores(probs, concept_idx, mode, exclusive, names)
    k = min(k, len(s))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    top = np.argpartition(-s, k - 1)[:k]
    order = np.lexsort((top, -s[top]))
    return top[order], s[top[order]]
