import pytest

from dgq_utils.model.tokenizer import build_word_level_tokenizer, check_word_level_tokenizer, out_of_vocabulary_words

WORDS = ["a", "red", "circle", "above", "blue", "square", "on", "grey", "background"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_word_level_tokenizer(WORDS, tmp_path_factory.mktemp("tok"))


def test_every_word_is_one_token_framed_by_bos_eos(tok):
    ids = tok("a red circle above a blue square")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in "a red circle above a blue square".split()]


def test_padding_like_sd(tok):
    enc = tok(["a red circle"], padding="max_length", max_length=tok.model_max_length, truncation=True)
    ids = enc["input_ids"][0]
    assert len(ids) == 77 and tok.model_max_length == 77
    assert ids[0] == tok.bos_token_id
    assert set(ids[4:]) == {tok.eos_token_id}  # SD v1.x pads with EOS


def test_unknown_words_fall_apart_into_characters_and_are_reported(tok):
    assert out_of_vocabulary_words(tok, "a red zebra") == ["zebra"]
    ids = tok("zebra")["input_ids"]
    assert len(ids) > 3  # characters, not an empty encoding


def test_check_rejects_a_tokenizer_that_does_not_know_the_words(tok):
    with pytest.raises(RuntimeError, match="Tokenizer check failed"):
        check_word_level_tokenizer(tok, ["triangle"])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least one word"):
        build_word_level_tokenizer([], tmp_path)
    with pytest.raises(ValueError, match="characters"):
        build_word_level_tokenizer(["Über"], tmp_path)


def test_words_sharing_pieces_still_encode_as_one_token(tmp_path):
    # "tree" inside "street", "cat" inside "concatenate", "tab" inside "table"/"stable": overlapping merges
    words = ["tree", "street", "photo", "cat", "concatenate", "table", "stable", "tab", "trees", "a", "at", "ta"]
    tok = build_word_level_tokenizer(words, tmp_path)  # raises if any word is not one token
    ids = tok("a photo at a street tree")["input_ids"]
    assert len(ids) == 8
