"""Keyword search: words -> concepts through a vocabulary with synonyms -> ranked items.

Vocabulary file (YAML)::

    concepts:            # concept name -> words and phrases that mean it
      "3": [three, trois]
    stopwords: [and, with, a, the]

Every concept also matches its own name.  Matching is case-insensitive; phrases of up to
``MAX_PHRASE`` words are matched longest first.  Words that match nothing (and are not
stopwords) are reported back, not silently dropped.

Scoring (``rank``): with ``p_i(c)`` the presence probability of concept ``c`` in item ``i``,
- ``all`` (default): ``score = prod_c p_i(c)``, the probability that every query concept is
  present if concepts are independent; computed as a sum of logs so many concepts do not
  underflow;
- ``any``: ``score = 1 - prod_c (1 - p_i(c))`` (noisy-or), the probability that at least one is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

MAX_PHRASE = 3
_TOKEN = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*", re.UNICODE)


@dataclass(frozen=True)
class ParsedQuery:
    concepts: list[str]  # distinct, in query order
    matched: dict[str, str]  # word/phrase -> concept
    unmatched: list[str]


class Vocabulary:
    def __init__(self, concepts: list[str], synonyms: dict[str, list[str]] | None = None,
                 stopwords: list[str] | None = None):
        self.concepts = list(concepts)
        self.lookup: dict[str, str] = {}
        for c in concepts:
            self.lookup[_norm(c)] = c
        for c, words in (synonyms or {}).items():
            if str(c) not in self.concepts:
                continue  # a vocabulary may cover more concepts than a given model has
            for w in words or []:
                self.lookup.setdefault(_norm(str(w)), str(c))
        self.stopwords = {_norm(w) for w in (stopwords or [])}

    @classmethod
    def from_file(cls, path: str | Path | None, concepts: list[str]) -> Vocabulary:
        if path is None:
            return cls(concepts)
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"vocabulary: no such file {p}")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict) or not isinstance(data.get("concepts", {}), dict):
            raise ValueError(f"vocabulary: {p} must hold 'concepts: {{concept: [synonyms]}}'")
        syn = {str(k): [str(w) for w in (v or [])] for k, v in (data.get("concepts") or {}).items()}
        return cls(concepts, syn, [str(w) for w in data.get("stopwords") or []])

    def parse(self, query: str) -> ParsedQuery:
        tokens = [_norm(t) for t in _TOKEN.findall(query or "")]
        concepts: list[str] = []
        matched: dict[str, str] = {}
        unmatched: list[str] = []
        i = 0
        while i < len(tokens):
            for n in range(min(MAX_PHRASE, len(tokens) - i), 0, -1):  # longest phrase first
                phrase = " ".join(tokens[i : i + n])
                if phrase in self.lookup:
                    c = self.lookup[phrase]
                    matched[phrase] = c
                    if c not in concepts:
                        concepts.append(c)
                    i += n
                    break
            else:
                if tokens[i] not in self.stopwords:
                    unmatched.append(tokens[i])
                i += 1
        return ParsedQuery(concepts, matched, unmatched)


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def scores(probs: np.ndarray, concept_idx: list[int], mode: str = "all") -> np.ndarray:
    """(N, K) probabilities -> (N,) scores for the query concepts (see the module doc)."""
    p = probs[:, concept_idx].astype(np.float64)  # (N, q)
    if mode == "all":
        return np.exp(np.log(np.clip(p, 1e-12, 1.0)).sum(axis=1))
    if mode == "any":
        return 1.0 - np.exp(np.log(np.clip(1.0 - p, 1e-12, 1.0)).sum(axis=1))
    raise ValueError(f"mode: expected 'all' or 'any', got {mode!r}")


def rank(probs: np.ndarray, concept_idx: list[int], k: int, mode: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and their scores, best first (ties broken by row for stable results)."""
    s = scores(probs, concept_idx, mode)
    k = min(k, len(s))
    if k == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    top = np.argpartition(-s, k - 1)[:k]
    order = np.lexsort((top, -s[top]))
    return top[order], s[top[order]]
