"""Answer extraction, case by case, as VLMEvalKit's matching_util.can_infer and XTuner's mmbench.py decide."""
from __future__ import annotations

import pytest

from vlmtune.errors import UserError
from vlmtune.eval.matchers import can_infer_option, can_infer_text, extract_answer

ANIMALS = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}
LONG = {"A": "a small grey cat", "B": "a brown dog", "C": "a bird", "D": "a goldfish"}


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("A", "A"),
        ("B.", "B"),
        ("(C)", "C"),
        ("[D]", "D"),
        ("**B**", "B"),
        ("Answer: C", "C"),
        ("The answer is D.", "D"),
        ("C. bird", "C"),  # letter first but within the last 4 tokens
        ("A B", None),  # two option letters: no decision
        ("A or B", None),
        ("A or B?", "A"),  # '?' is not stripped, so 'B?' is no letter token: only A counts (upstream quirk)
        ("a", None),  # lower case is not a letter token, and 'a' is no option text
        ("E", None),  # not an option of this question
        ("Z", "Z"),
        ("I'm sorry, but without the image provided I cannot tell.", "Z"),
        ("Cannot determine the answer", "Z"),
        ("Failed to obtain answer via API", None),
        ("A。", None),  # the CJK full stop is not in VLMEvalKit's punctuation list
    ],
)
def test_vlmevalkit_option_letters(prediction, expected):
    assert extract_answer(prediction, ANIMALS, "vlmevalkit") == expected


def test_letter_must_be_in_the_last_four_tokens():
    # PR #1175: a lone letter at the start of a long reply is not trusted ...
    assert can_infer_option("B because the animal in the picture clearly barks", ANIMALS) is None
    assert can_infer_option("B because it clearly barks", ANIMALS) is None  # 5 tokens: index 0 > 0 fails
    assert can_infer_option("B because it barks", ANIMALS) == "B"  # 4 tokens: index 0 > -1
    assert can_infer_option("it is B", ANIMALS) == "B"
    assert can_infer_option("so my final pick is B", ANIMALS) == "B"


def test_answer_is_fallback_for_verbose_replies():
    # PR #1552: 'answer is X' rescues replies where the letter is far from the end
    reply = "The correct answer is B. Here's why: option B shows an animal that barks at the mailman."
    assert can_infer_option(reply, ANIMALS) == "B"
    assert can_infer_option("The answer is **c**, since it has feathers and can fly high", ANIMALS) == "C"
    # two letters defeat the token rule, but the phrase still decides
    assert can_infer_option("My answer is A and also B, depending on how you read the image", ANIMALS) == "A"
    # the regex accepts a lower-case letter: 'answer is a cat' reads as A (an upstream quirk we keep)
    assert can_infer_option("I think the answer is a cat sitting on a mat in the sun", ANIMALS) == "A"
    # a letter that is not an option of this question is ignored
    assert can_infer_option("the answer is D", {"A": "yes", "B": "no"}) is None


def test_option_text_match_is_unique_and_length_guarded():
    assert can_infer_text("A cat.", ANIMALS) == "A"  # 'a' is lower case, so the letter rule passes it on
    assert extract_answer("a cat", ANIMALS) == "A"
    assert can_infer_text("cat or dog", ANIMALS) is None  # two options' texts
    # guard: 2 * (3 + 3 + 4 + 4) = 28 characters at most
    assert can_infer_text("it looks like a fish to me", ANIMALS) == "D"  # 26 characters
    assert can_infer_text("it looks very much like a fish", ANIMALS) is None  # 30 characters
    assert can_infer_text("A BROWN DOG", LONG) == "B"  # case-insensitive


def test_options_text_never_overrides_a_letter():
    # the letter rule answers first even when the text names another option
    assert extract_answer("B. cat", ANIMALS) == "B"


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("A", "A"),
        ("(C) bird", "C"),
        ("Dog", "D"),  # the first capital A-D anywhere, even inside a word
        ("The answer is B", "B"),  # 'T', 'h', 'e' are not A-D; first run is 'B'
        ("AB", "AB"),  # a run of letters: XTuner compares 'AB' with the answer, so it is wrong
        ("the answer is b", None),
        ("E", None),
    ],
)
def test_xtuner_first_capital_run(prediction, expected):
    assert extract_answer(prediction, ANIMALS, "xtuner") == expected


def test_matchers_disagree_where_they_should():
    assert extract_answer("Dog", ANIMALS, "vlmevalkit") == "B"  # text 'dog' -> B
    assert extract_answer("Dog", ANIMALS, "xtuner") == "D"


def test_unknown_matcher_is_a_user_error():
    with pytest.raises(UserError, match="unknown matcher 'gpt'; choose one of: vlmevalkit, xtuner"):
        extract_answer("A", ANIMALS, "gpt")
