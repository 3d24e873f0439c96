"""Golden ids/labels for every template, from LLaVA JSON records, on the tiny BPE and a real 32k SentencePiece.

The expectations are written out by hand from XTuner's rules (template_map_fn + encode_fn, llava_map_fn),
as the *encoding units* XTuner tokenizes one at a time:

    BOS (no loss) before turn 1, and before every turn that follows an EOS (suffix_as_eos=False: vicuna)
    system (turn 1 only) + instruction, split at each <image> (one IMAGE_TOKEN_INDEX id each) - no loss
    answer + SUFFIX - loss;  EOS - loss, only when suffix_as_eos=False;  SEP after every answer - no loss

and `<image>` is moved to the front of its human message as "<image>\\n" (llava_map_fn). Each unit is then
encoded on its own with `add_special_tokens=False`; that boundary matters for SentencePiece (every unit
gets its own leading "▁"), so the units below are exactly where XTuner splits.
"""
from __future__ import annotations

import copy
import sys

import pytest

from vlmtune.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vlmtune.data.llava_json import normalize_record
from vlmtune.data.templates import get_template
from vlmtune.data.tokenize import tokenize_conversation, tokenize_conversations, truncate

NO_LIMIT = sys.maxsize

BOS, EOS, IMG = ("<s>", False), ("</s>", True), ("<image>", False)


def P(text):
    """Prompt text: no loss."""
    return (text, False)


def A(text):
    """Answer text (with the template suffix): loss."""
    return (text, True)


def record(*messages, image=None):
    """A LLaVA JSON record from alternating human/gpt values."""
    roles = ["human", "gpt"] * len(messages)
    out = {"id": "r", "conversations": [{"from": r, "value": v} for r, v in zip(roles, messages)]}
    if image is not None:
        out["image"] = image
    return out


CASES = {
    "text": (record("What is the capital of France?", "Paris."), ""),
    # <image> at the end of the human text: llava_map_fn moves it to the front as "<image>\n"
    "image": (record("What is in the photo?\n<image>", "A cat.", image="cat.jpg"), ""),
    "multi": (record("<image>\nWhat is it?", "A cat.", "And its colour?", "Orange.", image="cat.jpg"), "Be brief."),
    "multi_nosys": (record("<image>\nWhat is it?", "A cat.", "And its colour?", "Orange.", image="cat.jpg"), ""),
}

VICUNA_SYS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. Be brief.\n "
)
IM_A = "<|im_end|>\n<|im_start|>assistant\n"
L3_U = "<|start_header_id|>user<|end_header_id|>\n\n"
L3_A = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"

GOLDEN = {
    "internlm2_chat": {
        "text": [BOS, P("<|im_start|>user\nWhat is the capital of France?" + IM_A), A("Paris.<|im_end|>"), P("\n")],
        "image": [BOS, P("<|im_start|>user\n"), IMG, P("\nWhat is in the photo?" + IM_A), A("A cat.<|im_end|>"), P("\n")],
        "multi": [
            BOS, P("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"), IMG, P("\nWhat is it?" + IM_A),
            A("A cat.<|im_end|>"), P("\n"),
            P("<|im_start|>user\nAnd its colour?" + IM_A), A("Orange.<|im_end|>"), P("\n"),
        ],
    },
    "vicuna": {
        "text": [BOS, P("USER: What is the capital of France? ASSISTANT:"), A("Paris."), EOS, P("\n")],
        "image": [BOS, P("USER: "), IMG, P("\nWhat is in the photo? ASSISTANT:"), A("A cat."), EOS, P("\n")],
        "multi": [
            BOS, P(VICUNA_SYS + "USER: "), IMG, P("\nWhat is it? ASSISTANT:"), A("A cat."), EOS, P("\n"),
            BOS, P("USER: And its colour? ASSISTANT:"), A("Orange."), EOS, P("\n"),
        ],
    },
    "llama3_chat": {
        "text": [BOS, P(L3_U + "What is the capital of France?" + L3_A), A("Paris.<|eot_id|>")],
        "image": [BOS, P(L3_U), IMG, P("\nWhat is in the photo?" + L3_A), A("A cat.<|eot_id|>")],
        "multi": [
            BOS, P("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>" + L3_U), IMG,
            P("\nWhat is it?" + L3_A), A("A cat.<|eot_id|>"),
            P(L3_U + "And its colour?" + L3_A), A("Orange.<|eot_id|>"),
        ],
    },
    "phi3_chat": {
        "text": [BOS, P("<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"), A("Paris.<|end|>"), P("\n")],
        "image": [BOS, P("<|user|>\n"), IMG, P("\nWhat is in the photo?<|end|>\n<|assistant|>\n"), A("A cat.<|end|>"), P("\n")],
        "multi": [
            BOS, P("<|system|>\nBe brief.<|end|>\n<|user|>\n"), IMG, P("\nWhat is it?<|end|>\n<|assistant|>\n"),
            A("A cat.<|end|>"), P("\n"),
            P("<|user|>\nAnd its colour?<|end|>\n<|assistant|>\n"), A("Orange.<|end|>"), P("\n"),
        ],
    },
    # LLaVA's preprocess_plain: image, caption + "\n" with loss, no EOS, no chat text, human text dropped
    "plain": {
        "text": [BOS, A("Paris.\n")],
        "image": [BOS, IMG, A("A cat.\n")],
        "multi_nosys": [BOS, IMG, A("A cat.\n"), A("Orange.\n")],
        "multi": [BOS, IMG, A("A cat.\n"), A("Orange.\n")],  # a system text is dropped too
    },
}
# XTuner's qwen_chat strings are character for character those of internlm2_chat
GOLDEN["qwen_chat"] = GOLDEN["internlm2_chat"]

GOLDEN_CASES = [(t, c) for t in GOLDEN for c in GOLDEN[t]]


def expected(segments, tok) -> tuple[list[int], list[int]]:
    """ids/labels of hand-written encoding units, each encoded on its own."""
    ids, labels = [], []
    for text, supervised in segments:
        if text == "<s>":
            unit = [tok.bos_token_id]
        elif text == "</s>":
            unit = [tok.eos_token_id]
        elif text == "<image>":
            unit = [IMAGE_TOKEN_INDEX]
        else:
            unit = tok.encode(text, add_special_tokens=False)
        ids += unit
        labels += unit if supervised else [IGNORE_INDEX] * len(unit)
    return ids, labels


def encode_case(template_name, case, tok, max_length=4096):
    """Our path: raw record -> normalize_record -> tokenize_conversation."""
    raw, system = CASES[case]
    sample = normalize_record(copy.deepcopy(raw), 0)
    return tokenize_conversation(sample.turns, tok, get_template(template_name), max_length, 576, system or sample.system)


@pytest.fixture(params=["tiny", "real"])
def tok(request, tiny_tokenizer, real_tokenizer):
    return {"tiny": tiny_tokenizer, "real": real_tokenizer}[request.param]


@pytest.mark.parametrize("template_name,case", GOLDEN_CASES)
def test_ids_and_labels_match_xtuner_units(template_name, case, tok):
    out = encode_case(template_name, case, tok)
    ids, labels = expected(GOLDEN[template_name][case], tok)
    assert out.input_ids == ids
    assert out.labels == labels
    assert out.num_images == sum(seg is IMG for seg in GOLDEN[template_name][case])
    assert out.length == len(ids) + 575 * out.num_images
    assert not out.truncated


@pytest.mark.parametrize("template_name,case", GOLDEN_CASES)
def test_ids_decode_to_the_handwritten_text(template_name, case, tiny_tokenizer):
    """The tiny BPE is byte-level and lossless: decoded ids give back the whole conversation string."""
    tok = tiny_tokenizer
    out = encode_case(template_name, case, tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    ids = [image_id if i == IMAGE_TOKEN_INDEX else i for i in out.input_ids]
    assert tok.decode(ids) == "".join(text for text, _ in GOLDEN[template_name][case])


def supervised_runs(ids, labels) -> list[list[int]]:
    """Maximal runs of positions that have loss."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            assert label == i
            current.append(i)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


@pytest.mark.parametrize("template_name,case", GOLDEN_CASES)
def test_supervised_spans_are_answer_suffix_eos(template_name, case, tiny_tokenizer):
    out = encode_case(template_name, case, tiny_tokenizer)
    runs = [tiny_tokenizer.decode(r) for r in supervised_runs(out.input_ids, out.labels)]
    answers = {"text": ["Paris."], "image": ["A cat."]}.get(case, ["A cat.", "Orange."])
    template = get_template(template_name)
    eos = "" if template.suffix_as_eos else "</s>"
    want = [a + template.suffix + eos for a in answers]
    if template_name == "plain":  # no prompt between plain turns: the two answers form one run
        want = ["".join(want)]
    assert runs == want


@pytest.mark.parametrize("template_name", sorted(GOLDEN))
def test_bos_once_unless_the_turn_follows_an_eos(template_name, tiny_tokenizer):
    tok = tiny_tokenizer
    ids = encode_case(template_name, "multi", tok).input_ids
    assert ids[0] == tok.bos_token_id
    n_bos = ids.count(tok.bos_token_id)
    n_eos = ids.count(tok.eos_token_id)
    if template_name == "vicuna":
        assert (n_bos, n_eos) == (2, 2)
    else:
        assert (n_bos, n_eos) == (1, 0)


@pytest.mark.parametrize("template_name", sorted(GOLDEN))
def test_generation_prompt_is_the_training_prefix(template_name, tok):
    """Chat/eval build the prompt with answer=None; it must be the exact prefix the model trained on."""
    template = get_template(template_name)
    turns = [("<image>\nWhat is it?", "A cat."), ("And its colour?", "Orange.")]
    full = tokenize_conversation(turns, tok, template, 4096, 576)
    prompt = tokenize_conversation([turns[0], (turns[1][0], None)], tok, template, 4096, 576)
    n = len(prompt.input_ids)
    assert full.input_ids[:n] == prompt.input_ids and full.labels[:n] == prompt.labels
    last_answer = tok.encode(template.render_output("Orange."), add_special_tokens=False)
    assert full.input_ids[n : n + len(last_answer)] == last_answer  # the answer starts right after the prompt
    assert full.labels[n] != IGNORE_INDEX


def test_real_tokenizer_pinned_vicuna_ids(real_tokenizer):
    """Pieces checked by eye against the text: '▁' is a space, '<0x0A>' the newline byte."""
    out = encode_case("vicuna", "image", real_tokenizer)
    pieces = [p if i != IMAGE_TOKEN_INDEX else i for i, p in zip(
        out.input_ids, real_tokenizer.convert_ids_to_tokens([max(i, 0) for i in out.input_ids]))]
    assert pieces == [
        "<s>", "▁US", "ER", ":", "▁", IMAGE_TOKEN_INDEX, "▁", "<0x0A>", "What", "▁is", "▁in", "▁the", "▁photo", "?",
        "▁ASS", "IST", "ANT", ":", "▁A", "▁cat", ".", "</s>", "▁", "<0x0A>",
    ]
    assert out.input_ids == [
        1, 2223, 725, 28747, 28705, -200, 28705, 13, 3195, 349, 297, 272, 8428, 28804,
        8602, 8048, 12738, 28747, 330, 5255, 28723, 2, 28705, 13,
    ]
    assert out.labels == [IGNORE_INDEX] * 18 + [330, 5255, 28723, 2] + [IGNORE_INDEX] * 2


def test_real_tokenizer_pinned_plain_ids_match_llava_preprocess_plain(real_tokenizer):
    """LLaVA: tokenizer_image_token('<image>A cat.\\n') = [BOS, -200, ▁A, ▁cat, ., \\n]; first two masked."""
    out = encode_case("plain", "image", real_tokenizer)
    assert real_tokenizer.convert_ids_to_tokens(out.input_ids[2:]) == ["▁A", "▁cat", ".", "<0x0A>"]
    assert out.input_ids == [1, -200, 330, 5255, 28723, 13]
    assert out.labels == [-100, -100, 330, 5255, 28723, 13]


def test_several_images_in_a_turn_stay_interleaved_with_the_text(tiny_tokenizer):
    """Two or more tags in a turn stay where the text puts them (LLaVA-NeXT's rule for interleaved data)."""
    tok = tiny_tokenizer
    raw = record("Compare <image> with <image>", "Same cat.", image=["a.jpg", "b.jpg"])
    sample = normalize_record(raw, 0)
    assert sample.turns == [("Compare <image> with <image>", "Same cat.")]
    out = tokenize_conversation(sample.turns, tok, get_template("internlm2_chat"), 4096, 576)
    segments = [BOS, P("<|im_start|>user\nCompare "), IMG, P(" with "), IMG, P(IM_A), A("Same cat.<|im_end|>"), P("\n")]
    assert (out.input_ids, out.labels) == expected(segments, tok)
    assert out.num_images == 2 and out.length == len(out.input_ids) + 2 * 575


def test_tokenizer_without_bos_gets_none(tiny_tokenizer):
    """Qwen2 tokenizers have no BOS; XTuner adds none for them (get_bos_eos_token_ids)."""
    tok = copy.deepcopy(tiny_tokenizer)
    tok.bos_token = None
    assert tok.bos_token_id is None
    out = tokenize_conversation([("Hi?", "Hello.")], tok, get_template("qwen_chat"), 4096, 576)
    body = [P("<|im_start|>user\nHi?" + IM_A), A("Hello.<|im_end|>"), P("\n")]
    assert (out.input_ids, out.labels) == expected(body, tok)


# ---- truncation: max_length counts every image as image_length tokens; an image is kept whole or dropped


def image_sample(tok):
    """ids/labels of a one-image internlm2 sample, and the number of ids before the image."""
    out = encode_case("internlm2_chat", "image", tok)
    return out.input_ids, out.labels, out.input_ids.index(IMAGE_TOKEN_INDEX)


def test_max_length_counts_the_image_as_576_tokens(tiny_tokenizer):
    ids, labels, before = image_sample(tiny_tokenizer)
    full = len(ids) + 575
    assert truncate(ids, labels, full, 576).input_ids == ids  # fits exactly
    cut = truncate(ids, labels, full - 1, 576)
    assert cut.truncated and cut.input_ids == ids[:-1] and cut.length == full - 1


@pytest.mark.parametrize("inside", [1, 300, 575])
def test_truncation_never_cuts_through_the_image(tiny_tokenizer, inside):
    ids, labels, before = image_sample(tiny_tokenizer)
    # the image occupies expanded positions before+1 .. before+576; stop anywhere inside it
    cut = truncate(ids, labels, before + inside, 576)
    assert cut.input_ids == ids[:before] and cut.labels == labels[:before]
    assert (cut.num_images, cut.length, cut.truncated) == (0, before, True)
    assert not cut.trainable


def test_image_kept_when_it_ends_exactly_at_max_length(tiny_tokenizer):
    ids, labels, before = image_sample(tiny_tokenizer)
    cut = truncate(ids, labels, before + 576, 576)
    assert cut.input_ids == ids[: before + 1] and cut.num_images == 1 and cut.length == before + 576


def test_answer_cut_partway_keeps_its_first_tokens_trainable(tiny_tokenizer):
    ids, labels, _ = image_sample(tiny_tokenizer)
    first_label = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    cut = truncate(ids, labels, first_label + 1 + 575, 576)  # keeps exactly one answer token
    assert cut.trainable and [l for l in cut.labels if l != IGNORE_INDEX] == [labels[first_label]]
    nothing = truncate(ids, labels, first_label + 575, 576)  # keeps the prompt only
    assert not nothing.trainable


def test_long_prompt_leaves_no_trainable_token(tiny_tokenizer):
    out = tokenize_conversation([("word " * 3000, "Short.")], tiny_tokenizer, get_template("vicuna"), 512, 576)
    assert out.truncated and len(out.input_ids) == 512 and out.length == 512
    assert not out.trainable


# ---- AnyRes: each image counts its own positions (per-image lengths), truncation still keeps images whole


def two_image_sample(tok):
    turns = [("First: <image>\nSecond: <image>\nCompare them.", "The second is wider.")]
    out = tokenize_conversation(turns, tok, get_template("internlm2_chat"), NO_LIMIT, 576)
    slots = [i for i, t in enumerate(out.input_ids) if t == IMAGE_TOKEN_INDEX]
    return out.input_ids, out.labels, slots


@pytest.mark.parametrize("lengths", [[1464, 984], [984, 2928], [576, 576]])
def test_each_image_counts_its_own_length(tiny_tokenizer, lengths):
    ids, labels, (first, second) = two_image_sample(tiny_tokenizer)
    full = len(ids) - 2 + sum(lengths)
    turns = [("First: <image>\nSecond: <image>\nCompare them.", "The second is wider.")]
    out = tokenize_conversation(turns, tiny_tokenizer, get_template("internlm2_chat"), NO_LIMIT, lengths)
    assert out.input_ids == ids and out.length == full
    assert truncate(ids, labels, full, lengths).input_ids == ids
    # the second image spans expanded positions [second + lengths[0] - 1, ... + lengths[1]); stop one short of its end
    end_of_second = second + lengths[0] - 1 + lengths[1]
    cut = truncate(ids, labels, end_of_second - 1, lengths)
    assert cut.input_ids == ids[:second] and (cut.num_images, cut.length) == (1, second - 1 + lengths[0])
    kept = truncate(ids, labels, end_of_second, lengths)  # ends exactly at max_length: kept whole
    assert kept.input_ids == ids[: second + 1] and kept.num_images == 2 and kept.length == end_of_second


def test_a_batch_with_per_image_lengths_equals_one_by_one(tiny_tokenizer):
    template = get_template("vicuna")
    conversations = [([("<image>\nWhat is it?", "A cat.")], ""), ([("Hi.", "Hello.")], ""),
                     ([("A: <image>\nB: <image>\nSame?", "No.")], "")]
    lengths = [[1368], [], [1306, 984]]
    batch = tokenize_conversations(conversations, tiny_tokenizer, template, 1400, lengths)
    for i, ((turns, system), own) in enumerate(zip(conversations, lengths)):
        one = tokenize_conversation(turns, tiny_tokenizer, template, 1400, own, system)
        assert batch[i] == one
    assert batch[2].num_images == 1 and batch[2].truncated  # 1306 + 984 > 1400: the second image is dropped whole
    with pytest.raises(ValueError, match="image slots per conversation"):
        tokenize_conversations(conversations, tiny_tokenizer, template, 1400, [[1368], [], [1306]])
