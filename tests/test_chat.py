"""`vlmtune chat` on a converted tiny checkpoint: KV-cache reuse, --prompt, --batch, errors, and the
interactive loop through a real pseudo-terminal.

The KV-cache check is the one that matters for correctness: turn n+1 run on top of turn n's cache must give
the tokens (and, to float rounding, the logits) of running the whole re-encoded history from scratch, while
the LLM actually computes only the new positions.
"""
from __future__ import annotations

import io
import json
import os
import re
import sys

import pexpect
import pytest
import torch
from convert.convert_helpers import IMAGE, LOGIT_ATOL, checkpoint, chat_generator, converted, error_line  # noqa: F401

from vlmtune.chat import PROMPT, Conversation, interact
from vlmtune.cli import main as cli_main
from vlmtune.constants import DEFAULT_IMAGE_TOKEN
from vlmtune.data.image import load_image
from vlmtune.errors import UserError

MAX_NEW = 8
TURNS = ["What is in the image?", "What colour is it?", "Describe it in one word."]


@pytest.fixture(scope="module")
def folder(converted):
    return converted("lora", "xtuner")


@pytest.fixture(scope="module")
def generator(folder, tiny):
    return chat_generator(str(tiny.llm), "--llava", str(folder))


def chat_argv(tiny, folder, *extra: str) -> list[str]:
    return ["chat", str(tiny.llm), "--llava", str(folder), "--max-new-tokens", str(MAX_NEW), "--torch-dtype", "float32",
            "--device", "cpu", *extra]


def reference_answers(generator, turns=TURNS) -> list[str]:
    conversation = Conversation(generator, load_image(IMAGE))
    return [conversation.ask(t, max_new_tokens=MAX_NEW, do_sample=False) for t in turns]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b) - 1) and a[n] == b[n]:
        n += 1
    return n


def test_kv_cache_reuse_equals_reencoding_the_history(generator):
    conversation = Conversation(generator, load_image(IMAGE))
    layer = next(m for name, m in generator.model.llm.named_modules() if name.endswith("layers.0"))
    run_lengths: list[int] = []  # sequence length of every pass through the LLM's first layer

    def record(module, args, kwargs):
        run_lengths.append((args[0] if args else kwargs["hidden_states"]).shape[1])

    hook = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        conversation.ask(TURNS[0], max_new_tokens=MAX_NEW, do_sample=False)
        for text in TURNS[1:]:
            full_ids = generator.prompt_ids([*conversation.turns, (text, None)])
            kept = common_prefix(conversation.cached_ids, full_ids)  # ids the cache already holds
            run_lengths.clear()
            answer = conversation.ask(text, max_new_tokens=MAX_NEW, do_sample=False)
            with torch.inference_mode():
                fresh = generator.generate_embeds(generator.embed([full_ids], conversation.features),
                                                  max_new_tokens=MAX_NEW, do_sample=False)[0].tolist()
            full_positions = len(full_ids) + generator.image_length - 1
            print(f"\nturn {len(conversation.turns)}: ran {run_lengths[0]} of {full_positions} prompt positions; "
                  f"answer {answer!r} == re-encoded {generator.decode(fresh)!r}")
            assert answer == generator.decode(fresh)
            assert run_lengths[0] == len(full_ids) - kept  # the image and earlier turns were not run again
            assert kept > 1 and run_lengths[0] < full_positions - generator.image_length
    finally:
        hook.remove()


def test_kv_cache_logits_match_full_forward(generator):
    conversation = Conversation(generator, load_image(IMAGE))
    conversation.ask(TURNS[0], max_new_tokens=MAX_NEW, do_sample=False)
    ids = generator.prompt_ids([*conversation.turns, (TURNS[1], None)])
    with torch.inference_mode():
        conversation._reuse_cache(ids)
        held = conversation.cache.get_seq_length()
        inputs = generator.embed([ids], conversation.features)
        cached = generator.model.llm(inputs_embeds=inputs["inputs_embeds"][:, held:], attention_mask=inputs["attention_mask"],
                                     cache=conversation.cache).logits[0, -1]
        full = generator.model.llm(**inputs).logits[0, -1]
    diff = (cached - full).abs().max().item()
    print(f"\nKV-cache reuse: {held} cached positions; max |last logits cached - full| = {diff:.2e}")
    assert held > generator.image_length and diff < LOGIT_ATOL


def test_prompt_flag_answers_one_conversation_deterministically(generator, folder, tiny, capsys):
    want = reference_answers(generator, TURNS[:2])
    argv = chat_argv(tiny, folder, "--image", str(IMAGE), "--prompt", TURNS[0], "--prompt", TURNS[1])
    assert cli_main([*argv, "--no-streamer"]) == 0
    first = capsys.readouterr().out
    assert first.splitlines() == want
    assert cli_main(argv) == 0  # streamed: the same text
    assert [line.strip() for line in capsys.readouterr().out.splitlines()] == [a.strip() for a in want]


def test_batch_jsonl(generator, folder, tiny, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(IMAGE.read_bytes())
    records = [{"id": 1, "image": "photos/cat.jpg", "prompt": "What is in the image?"},
               {"id": 2, "prompt": "Say something."},
               {"id": 3, "image": "photos/cat.jpg", "prompt": f"{DEFAULT_IMAGE_TOKEN}\nIs it a cat? Answer yes or no."}]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "answers.jsonl"
    assert cli_main(chat_argv(tiny, folder, "--batch", str(tmp_path / "q.jsonl"), "--output", str(out))) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    image = load_image(IMAGE)
    want = [generator.answer(r["prompt"], image if "image" in r else None, max_new_tokens=MAX_NEW) for r in records]
    assert [{k: v for k, v in g.items() if k != "answer"} for g in got] == records
    assert [g["answer"] for g in got] == want


@pytest.mark.parametrize("extra, message", [
    (["--image", "nope.jpg", "--prompt", "hi"], "--image nope.jpg"),
    (["--prompt-template", "vicunaa", "--prompt", "hi"], "unknown prompt template 'vicunaa'"),
])
def test_input_errors_are_one_line(extra, message, folder, tiny, capsys):
    assert cli_main(chat_argv(tiny, folder, *extra)) == 2
    assert message in error_line(capsys)


def test_folder_that_is_not_converted(tiny, tmp_path, capsys):
    assert cli_main(chat_argv(tiny, tmp_path, "--prompt", "hi")) == 2
    assert "not a converted model" in error_line(capsys)


def test_batch_line_with_missing_image(folder, tiny, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"prompt": "a"}\n{"image": "gone.jpg", "prompt": "b"}\n')
    assert cli_main(chat_argv(tiny, folder, "--batch", str(tmp_path / "q.jsonl"))) == 2
    assert "q.jsonl:2: image 'gone.jpg' not found" in error_line(capsys)


@pytest.fixture
def context(generator):
    """Set the LLM's context length (`max_position_embeddings`, read by the guard only) for one test."""
    config = generator.model.llm.config.get_text_config()
    saved = config.max_position_embeddings

    def set_to(n: int) -> None:
        config.max_position_embeddings = n

    yield set_to
    config.max_position_embeddings = saved


def test_answers_stop_at_the_context_and_a_full_context_keeps_the_history(generator, context):
    conversation = Conversation(generator, load_image(IMAGE))
    first = conversation.ask(TURNS[0], max_new_tokens=MAX_NEW, do_sample=False)
    ids = generator.prompt_ids([*conversation.turns, (TURNS[1], None)])
    context(generator.expanded_length(ids) + 2)  # room for 2 new tokens only
    second = conversation.ask(TURNS[1], max_new_tokens=MAX_NEW, do_sample=False)
    generated = len(conversation.cached_ids) - len(ids) + 1  # the cache holds all but the last new id
    assert conversation.cached_ids[: len(ids)] == ids and generated == 2 < MAX_NEW
    assert len(conversation.turns) == 2
    with pytest.raises(UserError, match=r"the conversation; RESET starts over: \d+ tokens \(images counted\), the model's context is"):
        conversation.ask(TURNS[2], max_new_tokens=MAX_NEW, do_sample=False)
    assert [t[1] for t in conversation.turns] == [first, second]  # the failed turn is not added


def test_interactive_full_context_is_a_log_line_not_an_exit(generator, context, monkeypatch, capsys):
    conversation = Conversation(generator, load_image(IMAGE))
    context(generator.image_length)  # the image alone fills it
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n\nEXIT\n"))
    assert interact(conversation, True, {"max_new_tokens": MAX_NEW, "do_sample": False}) == 0
    out = capsys.readouterr().out
    assert "Log: the conversation; RESET starts over:" in out and "Log: Exit!" in out and conversation.turns == []


def test_batch_prompt_with_a_lone_surrogate_is_one_line(folder, tiny, tmp_path, capsys):
    (tmp_path / "q.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "half an emoji \\ud83d"}\n')
    assert cli_main(chat_argv(tiny, folder, "--batch", str(tmp_path / "q.jsonl"))) == 2
    assert "q.jsonl:2: 'prompt' holds '\\ud83d'" in error_line(capsys)


def test_batch_image_that_does_not_decode_is_one_line(folder, tiny, tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (tmp_path / "q.jsonl").write_text('{"image": "broken.jpg", "prompt": "b"}\n')
    assert cli_main(chat_argv(tiny, folder, "--batch", str(tmp_path / "q.jsonl"))) == 2
    assert "--batch image" in error_line(capsys)


def test_interactive_two_turns_reset_exit_in_a_pty(generator, folder, tiny):
    want = reference_answers(generator, TURNS[:2])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    child = pexpect.spawn(sys.executable, ["-m", "vlmtune", *chat_argv(tiny, folder, "--image", str(IMAGE))],
                          env=env, encoding="utf-8", codec_errors="replace", timeout=180)
    prompt = re.escape(PROMPT.strip())

    def say(text: str) -> str:
        child.send(text + "\n\n")  # XTuner's input ends at an empty line
        child.expect(prompt)
        return child.before.replace("\r\n", "\n")

    try:
        child.expect(prompt)
        out1, out2 = say(TURNS[0]), say(TURNS[1])
        assert want[0].strip() in out1 and want[1].strip() in out2
        assert "History responses have been removed" in say("RESET")
        assert want[0].strip() in say(TURNS[0])  # the history is gone: the first answer again
        child.send("EXIT\n\n")
        child.expect("Exit!")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
