"""The bundled demo corpus: a deterministic toy translation task, shipped under ``data/``.

Source sentences (``.src``) follow a small SVO grammar over pseudo-words; the target language
(``.tgt``) is SOV with adjectives after their noun, and every word has its own target word::

    src: ruro sasu munu rereme kete sele      (det adj noun verb det noun)
    tgt: hy xihu yiqu yihe wigyyu hogi        (det noun adj det noun verb)

So a model must learn a lexicon and two reorderings, which a small transformer does in a few
hundred updates; BLEU on ``test`` tells whether training worked. :func:`write_corpus` regenerates
the files byte for byte (a test checks that the shipped ones match).
"""
from __future__ import annotations

import os
import random
from typing import Dict, List, Tuple

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
SOURCE_LANG, TARGET_LANG = "src", "tgt"
SPLITS = {"train": 4000, "valid": 200, "test": 200}
_SEED = 20240611
_WORD_COUNTS = {"det": 4, "adj": 40, "noun": 80, "verb": 40, "adv": 12}
_SOURCE_SYLLABLES = [c + v for c in "bdfklmnprstv" for v in "aeiou"]
_TARGET_SYLLABLES = [c + v for c in "ghjqwxyz" for v in "aeiouy"]


def _words(rng: random.Random, syllables: List[str], count: int, taken: set) -> List[str]:
    words = []
    while len(words) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3))))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _lexicon(rng: random.Random) -> Dict[str, List[Tuple[str, str]]]:
    """Per part of speech, (source word, target word) pairs; both vocabularies are disjoint."""
    source_taken, target_taken = set(), set()
    return {pos: list(zip(_words(rng, _SOURCE_SYLLABLES, n, source_taken),
                          _words(rng, _TARGET_SYLLABLES, n, target_taken)))
            for pos, n in _WORD_COUNTS.items()}


def _noun_phrase(rng: random.Random, lex) -> Tuple[List[str], List[str]]:
    det, noun = rng.choice(lex["det"]), rng.choice(lex["noun"])
    adjs = [rng.choice(lex["adj"]) for _ in range(rng.choice((0, 0, 1, 1, 2)))]
    source = [det[0]] + [a[0] for a in adjs] + [noun[0]]
    target = [det[1], noun[1]] + [a[1] for a in reversed(adjs)]
    return source, target


def _sentence(rng: random.Random, lex) -> Tuple[str, str]:
    subj_s, subj_t = _noun_phrase(rng, lex)
    obj_s, obj_t = _noun_phrase(rng, lex)
    verb = rng.choice(lex["verb"])
    source, target = subj_s + [verb[0]] + obj_s, subj_t + obj_t + [verb[1]]
    if rng.random() < 0.3:
        adv = rng.choice(lex["adv"])
        source, target = source + [adv[0]], [adv[1]] + target
    return " ".join(source), " ".join(target)


def generate() -> Dict[str, List[Tuple[str, str]]]:
    """split -> distinct (source, target) pairs; no sentence appears in two splits."""
    rng = random.Random(_SEED)
    lex = _lexicon(rng)
    seen, corpus = set(), {}
    for split, size in SPLITS.items():
        pairs = []
        while len(pairs) < size:
            pair = _sentence(rng, lex)
            if pair[0] not in seen:
                seen.add(pair[0])
                pairs.append(pair)
        corpus[split] = pairs
    return corpus


def write_corpus(directory: str = DATA_DIR) -> None:
    """Writes ``{split}.src`` / ``{split}.tgt`` (one sentence per line) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for split, pairs in generate().items():
        for lang, column in ((SOURCE_LANG, 0), (TARGET_LANG, 1)):
            with open(os.path.join(directory, f"{split}.{lang}"), "w", encoding="utf-8") as f:
                f.writelines(pair[column] + "\n" for pair in pairs)


def prefix(split: str, directory: str = DATA_DIR) -> str:
    """The ``--trainpref``-style prefix of a split (fairseq-preprocess appends ``.src``/``.tgt``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return os.path.join(directory, split)
