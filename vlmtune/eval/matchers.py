"""Judge-free answer extraction: which option letter a model's free-text prediction picks.

`vlmevalkit` (default) follows vlmeval/utils/matching_util.py `can_infer` (can_infer_option, then
can_infer_text) as on VLMEvalKit main after PR #1175 (letter must sit in the last tokens; text-match length
guard) and PR #1552 ('answer is X' fallback), which is what `exact_matching` (no GPT judge) scores with.
`xtuner` follows xtuner/tools/mmbench.py `eval_result`: the first run of capital A-D letters anywhere.
"""
from __future__ import annotations

import re

from vlmtune.errors import UserError

MATCHERS = ("vlmevalkit", "xtuner")
REFUSAL = "Z"  # VLMEvalKit's pseudo-option for 'the model refused / none of the options'

# matching_util.can_infer_option: replies that mean the model gave no answer
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_API_FAILURE = "Failed to obtain answer via API"
_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
_LAST_TOKENS = 5  # the single letter must have index > len(tokens) - 5
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
_XTUNER = re.compile(r"([A-D]+)")


def extract_answer(prediction: str, options: dict[str, str], matcher: str = "vlmevalkit") -> str | None:
    """The option letter `prediction` picks, 'Z' for a recognised refusal (vlmevalkit), None when unknown.

    With `xtuner` the result may be several letters ('AB'): XTuner then counts the row wrong, and so do we.
    """
    check_matcher(matcher)
    prediction = str(prediction)
    if matcher == "xtuner":
        match = _XTUNER.search(prediction)
        return match.group(1) if match else None
    return can_infer_option(prediction, options) or can_infer_text(prediction, options)


def check_matcher(matcher: str) -> None:
    """UserError unless `matcher` is one of MATCHERS."""
    if matcher not in MATCHERS:
        raise UserError(f"unknown matcher {matcher!r}; choose one of: {', '.join(MATCHERS)}")


def can_infer_option(prediction: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit can_infer_option: an option letter standing alone as a token, near the end.

    Punctuation .()[],:;!*#{} becomes spaces, then the text splits on whitespace. Exactly one option letter
    among the tokens, first seen at one of the last 4 positions -> that letter. No option letter but a 'Z'
    token -> 'Z'. Otherwise an 'answer is X' phrase (X in A-D, any case, optional ** around it) -> X.
    """
    if _API_FAILURE in prediction:
        return None
    if any(refusal in prediction for refusal in _REFUSALS):
        return REFUSAL
    tokens = prediction.translate(_PUNCTUATION).split()
    present = [letter for letter in options if letter in tokens]
    if len(present) == 1:
        if tokens.index(present[0]) > len(tokens) - _LAST_TOKENS:
            return present[0]
    elif not present and REFUSAL in tokens:
        return REFUSAL
    match = _ANSWER_IS.search(prediction)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def can_infer_text(prediction: str, options: dict[str, str]) -> str | None:
    """VLMEvalKit can_infer_text: exactly one option's text occurs in the prediction (case-insensitive).

    Skipped when the prediction is longer than twice the options' total length (a long explanation
    mentions several options in passing).
    """
    text = prediction.lower()
    if len(text) > 2 * sum(len(str(v)) for v in options.values()):
        return None
    found = [letter for letter, option in options.items() if str(option).lower() in text]
    return found[0] if len(found) == 1 else None
