import numpy as np
import pytest

from t2i.data.text import PAD, UnknownCaptionError, load_glove, tokenize, vocabulary_for
from t2i.errors import T2IError


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog's ball, in the PARK!") == ["a", "dog", "'s", "ball", "in", "the", "park"]
    assert tokenize("  ... ") == []


def test_tokenize_splits_clitics_as_glove_saw_them():
    """GloVe 6B has "'s" and "n't" but no "man's": "a man's hat" must keep "man"."""
    assert tokenize("A man\u2019s dog doesn't run; they're here, can't stop") == [
        "a", "man", "'s", "dog", "does", "n't", "run", "they", "'re", "here", "ca", "n't", "stop"]
    assert tokenize("a horse 's lead") == ["a", "horse", "'s", "lead"]  # Flickr8k's captions come split
    assert tokenize("the 'big' dog") == ["the", "big", "dog"]  # quotes are not clitics
    vocab = load_glove(None, ["a", "man", "'s", "hat", "does", "n't"])
    _mean, ids = vocab.encode("a man's hat doesn't", 8)
    assert [vocab.words[i] for i in ids if i] == ["a", "man", "'s", "hat", "does", "n't"]


def test_package_glove_known_vector_and_order():
    vocab = load_glove(None, ["dog", "the", "zzzqqqnotaword"])
    assert vocab.words == [PAD, "dog", "the"]
    assert vocab.dim == 50
    # First numbers of the published GloVe 6B 50d vector for "the".
    np.testing.assert_allclose(vocab.vectors[2][:3], [0.418, 0.24968, -0.41242], rtol=1e-5)
    assert not vocab.vectors[0].any()


def test_encode_mean_skips_unknown_words_and_pads_ids():
    vocab = load_glove(None, ["red", "dog"])
    mean, ids = vocab.encode("a red blorfly dog", max_words=4)
    np.testing.assert_allclose(mean, (vocab.vectors[1] + vocab.vectors[2]) / 2, rtol=1e-6)
    assert ids.tolist() == [1, 2, 0, 0]
    _, cut = vocab.encode("red dog red dog red", max_words=3)
    assert cut.tolist() == [1, 2, 1]


def test_all_unknown_caption_is_an_error_naming_the_words():
    vocab = load_glove(None, ["red"])
    with pytest.raises(UnknownCaptionError, match="blorfly"):
        vocab.encode("blorfly zzkx", max_words=4)
    with pytest.raises(UnknownCaptionError, match="no words"):
        vocab.encode("!!!", max_words=4)


def test_stanford_text_file_is_streamed_and_restricted(tmp_path):
    path = tmp_path / "glove.6B.3d.txt"
    path.write_text("the 0.1 0.2 0.3\ndog 1 2 3\ncat 4 5 6\n")
    vocab = load_glove(path, ["cat", "dog", "bird"])
    assert vocab.words == [PAD, "cat", "dog"]
    assert vocab.vectors.shape == (3, 3)
    np.testing.assert_allclose(vocab.vectors[1], [4, 5, 6])
    full = vocabulary_for(["the dog", "the cat"], path)
    assert full.words[:2] == [PAD, "the"]  # most frequent first


def test_broken_glove_file_is_reported(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("the 0.1 0.2\ndog 1\n")
    with pytest.raises(T2IError, match="expected 2 numbers"):
        load_glove(path, ["the", "dog"])
    with pytest.raises(T2IError, match="GloVe file not found"):
        load_glove(tmp_path / "missing.txt", ["the"])
