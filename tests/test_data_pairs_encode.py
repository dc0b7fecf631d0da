"""Encoding preference pairs: the labels cover the final reply only, with the SFT truncation rules."""

import pytest

from chatbuild.data.batching import tokenize_pairs
from chatbuild.data.pairs import Pair, check_pair
from chatbuild.errors import UserError
from chatbuild.templates import IGNORE_INDEX, encode, make_format

PROMPT = ({"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
          {"role": "user", "content": "Another one?"})


def test_only_the_final_reply_is_learned(tiny_tokenizer):
    fmt = make_format("guanaco", None, tiny_tokenizer)
    [enc] = tokenize_pairs([Pair(PROMPT, "Blue, like the sea.", "No.")], fmt, tiny_tokenizer, None)
    full = encode(fmt, tiny_tokenizer, [*PROMPT, {"role": "assistant", "content": "Blue, like the sea."}])
    assert enc.chosen.input_ids == full.input_ids
    learned = [t for t, label in zip(enc.chosen.input_ids, enc.chosen.labels) if label != IGNORE_INDEX]
    assert tiny_tokenizer.decode(learned).strip().startswith("Blue, like the sea.")
    assert "Red." not in tiny_tokenizer.decode(learned)
    # SFT learns both replies of the same conversation; the pair learns strictly fewer tokens.
    assert sum(label != IGNORE_INDEX for label in full.labels) > len(learned)
    assert learned[-1] == tiny_tokenizer.eos_token_id


def test_a_long_reply_is_cut_with_a_trained_eos(tiny_tokenizer):
    fmt = make_format("guanaco", None, tiny_tokenizer)
    [enc] = tokenize_pairs([Pair(PROMPT, "word " * 200, "No.")], fmt, tiny_tokenizer, 40)
    assert len(enc.chosen) == 40 and enc.chosen.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert enc.chosen.labels[-1] == tiny_tokenizer.eos_token_id
    assert len(enc.rejected) < 40


@pytest.mark.parametrize("pair, problem", [
    (Pair(PROMPT, "Blue.", "Blue. "), "the same reply"),
    (Pair(PROMPT, "", "No."), 'field "chosen": the reply is empty'),
    (Pair(PROMPT[:2], "Blue.", "No."), "must end with a user turn"),
])
def test_bad_pairs_are_refused_in_one_line(pair, problem):
    with pytest.raises(UserError, match=problem):
        check_pair(pair, where="pairs.jsonl:3")
