"""The docs cannot rot: every command, flag, config, template, link and path they mention exists.

Checked over README.md and docs/**/*.md (plus the commands of scripts/quickstart.sh):
- `vlmtune SUB [ACTION]` in code blocks and inline code is a real subcommand of `vlmtune.cli.build_parser()`,
  and every `--flag` written after it (up to the end of the command) is an option of that subcommand; an
  inline span that starts with a flag (`--is-clip`) is an option of some subcommand;
- config names (`llava_..._pretrain`, `tiny_llava_...`, the argument of `vlmtune train` / `copy-cfg`) are in
  `vlmtune list-cfg`; template names (`--prompt-template X`, `prompt_template = 'X'`, `` `X_chat` ``) exist;
- relative links and images resolve; `docs/...`, `scripts/...`, `vlmtune/...`, `tests/...`, `configs/...` paths exist;
- docs/en and docs/zh_cn hold the same pages with the same `##` sections, images and code blocks;
- README's two set-up commands are what `.ci/run` and `scripts/quickstart.sh` run.
The checker is run on a synthetic page with one mistake of each kind, so a check that silently finds
nothing fails too.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from vlmtune.cli import build_parser
from vlmtune.config import list_configs
from vlmtune.data.templates import TEMPLATES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = ("en", "zh_cn")

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # an inline code span may wrap onto the next line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
IMG_TAG = re.compile(r"<img\s[^>]*src=\"([^\"]+)\"")
CONFIG_NAME = re.compile(r"\b(?:tiny_)?llava(?:_\w+)?_(?:pretrain|finetune)(?:_\w+)?\b")
REPO_PATH = re.compile(r"(?<![\w./-])(?:docs|scripts|vlmtune|tests|configs)/[\w./*<>-]*")
TEMPLATE_KEY = re.compile(r"prompt_template\s*=\s*['\"](\w+)['\"]")
# Flags of other tools that the docs name on their own: XTuner chat's (not ported) and VLMEvalKit's.
FOREIGN_FLAGS = {"--with-plugins", "--lagent", "--bot-name", "--offload-folder", "--system-template", "--judge"}
ENDS_COMMAND = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "#", "->", "<-", "=", "\\", "/"}


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def split_code(text: str) -> tuple[list[str], str]:
    """(fenced code blocks, the prose with them blanked out)."""
    blocks = [m.group(1) for m in FENCE.finditer(text)]
    return blocks, FENCE.sub("", text)


def code_lines(text: str) -> list[str]:
    """Every command-like line: lines of fenced blocks (backslash and `[--flag` continuations joined) and
    inline code spans (a span wrapping onto the next line joined)."""
    blocks, prose = split_code(text)
    lines = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if lines and re.match(r"\s+\[--", line) and "vlmtune" in lines[-1]:
                lines[-1] += " " + line.strip()  # a usage synopsis wrapped onto an indented line
            else:
                lines.append(line)
    lines += [" ".join(m.group(1).split()) for m in INLINE.finditer(prose)]
    return lines


def tokens(line: str) -> list[str]:
    line = line.replace("`", " ")
    try:
        return shlex.split(line, comments=False)
    except ValueError:  # an unbalanced quote in prose-like code: plain split is good enough
        return line.split()


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def is_placeholder(token: str) -> bool:
    """CFG, NAME, <config>, ..., [ACTION]: a stand-in for a value, not a value."""
    bare = token.strip("[]<>")
    return bare == "" or "..." in token or "<" in token or bare.isupper() or bare.replace("_", "").isupper()


def flag_names(token: str) -> list[str]:
    """The option string(s) a token stands for: `[--x` -> --x, `--x=1` -> --x, `--[no-]x` -> --x, --no-x."""
    token = token.strip("[]()").split("=")[0].split("/")[0]
    if not re.match(r"^--?[A-Za-z\[]", token):
        return []
    if "[no-]" in token:
        return [token.replace("[no-]", ""), token.replace("[no-]", "no-")]
    return [token]


def command_problems(line: str, parser: argparse.ArgumentParser, where: str) -> list[str]:
    """Problems with each `vlmtune ...` command in one line of code."""
    problems = []
    words = tokens(line)
    for start in [i for i, w in enumerate(words) if w == "vlmtune"]:
        rest = []
        for w in words[start + 1:]:
            if w in ENDS_COMMAND or w == "vlmtune" or w.startswith("#"):
                break
            rest.append(w)
        if not rest or rest[0].startswith("-"):
            continue  # `vlmtune` alone, `vlmtune --help`
        subs = subparsers(parser)
        if rest[0] not in subs:
            problems.append(f"{where}: `vlmtune {rest[0]}` is not a subcommand (have {', '.join(subs)})")
            continue
        command, args, name = subs[rest[0]], rest[1:], f"vlmtune {rest[0]}"
        actions = subparsers(command)
        if actions and args and not args[0].startswith("-") and not is_placeholder(args[0]):
            if args[0] not in actions:
                problems.append(f"{where}: `{name} {args[0]}` is not an action of {name} (have {', '.join(actions)})")
                continue
            command, args, name = actions[args[0]], args[1:], f"{name} {args[0]}"
        known = set(command._option_string_actions) | {"--help", "-h"}
        for word in args:
            for flag in flag_names(word):
                if flag not in known:
                    problems.append(f"{where}: `{name}` has no option {flag}")
        problems += config_argument_problems(name, args, where)
    return problems


def all_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of every (sub)command."""
    found = set(parser._option_string_actions)
    for sub in subparsers(parser).values():
        found |= all_options(sub)
    return found


def standalone_flag_problems(text: str, parser: argparse.ArgumentParser, where: str) -> list[str]:
    """An inline code span that starts with a flag (`--is-clip`, `--bits 4`) names an option of some subcommand."""
    known = all_options(parser) | FOREIGN_FLAGS
    spans = [" ".join(m.group(1).split()) for m in INLINE.finditer(split_code(text)[1])]
    return [f"{where}: no vlmtune command has the option {flag} (`{span}`)"
            for span in spans if span.startswith("-")
            for word in tokens(span) for flag in flag_names(word) if flag not in known]


def config_argument_problems(name: str, args: list[str], where: str) -> list[str]:
    """The config argument of train / copy-cfg / convert pth_to_hf is a shipped name, a path or a placeholder."""
    if name not in ("vlmtune train", "vlmtune copy-cfg"):
        return []
    positional = [a for a in args if not a.startswith("-")]
    if not positional:
        return []
    value = positional[0]
    if is_placeholder(value) or "/" in value or value.endswith(".py") or value in list_configs():
        return []
    return [f"{where}: config {value!r} after `{name}` is not a shipped config (`vlmtune list-cfg`)"]


def name_problems(text: str, where: str) -> list[str]:
    """Config and template names anywhere in the text."""
    problems = []
    shipped = set(list_configs())
    for m in CONFIG_NAME.finditer(text):
        name = m.group(0).removesuffix("_copy")
        if name not in shipped:
            problems.append(f"{where}: config name {m.group(0)} is not shipped (`vlmtune list-cfg`)")
    templates = set(m.group(1) for m in TEMPLATE_KEY.finditer(text))
    for line in code_lines(text):
        words = tokens(line)
        templates |= {b for a, b in zip(words, words[1:]) if a == "--prompt-template" and not is_placeholder(b)}
        if re.fullmatch(r"\w+_chat", line.strip()):
            templates.add(line.strip())
    problems += [f"{where}: prompt template {t!r} does not exist (have {', '.join(TEMPLATES)})"
                 for t in sorted(templates) if t not in TEMPLATES]
    return problems


def path_problems(text: str, md_dir: Path, where: str) -> list[str]:
    """Relative links and images resolve from the page; repo paths resolve from the repo root."""
    problems = []
    for target in [m.group(1) for m in LINK.finditer(text)] + IMG_TAG.findall(text):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue  # http(s), mailto, an anchor on the same page
        if not (md_dir / target.split("#")[0]).exists():
            problems.append(f"{where}: link or image {target} does not resolve")
    for m in REPO_PATH.finditer(split_code(text)[1] + "\n".join(split_code(text)[0])):
        path = m.group(0).rstrip(".,:;)")
        if any(c in path for c in "*<>") or "..." in path:
            continue  # a pattern or a placeholder
        if not (ROOT / path).exists():
            problems.append(f"{where}: path {path} does not exist")
    return problems


def check_markdown(text: str, md_dir: Path, where: str) -> list[str]:
    """Every problem the docs test looks for in one markdown text."""
    parser = build_parser()
    problems = [p for line in code_lines(text) for p in command_problems(line, parser, where)]
    problems += standalone_flag_problems(text, parser, where)
    return problems + name_problems(text, where) + path_problems(text, md_dir, where)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_mentions_only_what_exists(path):
    assert check_markdown(path.read_text(encoding="utf-8"), path.parent, str(path.relative_to(ROOT))) == []


def test_quickstart_script_commands_parse():
    parser = build_parser()
    text = re.sub(r"\\\n\s*", " ", (ROOT / "scripts/quickstart.sh").read_text())
    lines = [line for line in text.splitlines() if "vlmtune " in line and not line.lstrip().startswith("#")]
    assert len(lines) >= 9
    assert [p for line in lines for p in command_problems(line, parser, "quickstart.sh")] == []


def test_the_checker_catches_broken_references(tmp_path):
    (tmp_path / "real.md").write_text("x")
    page = """
## A page with one mistake of each kind
```bash
vlmtune trian tiny_llava_pretrain
vlmtune train tiny_llava_pretrian --work-dir out
NPROC_PER_NODE=2 vlmtune train tiny_llava_pretrain --no-such-flag 1 \\
    --cfg-options lr=1e-4
vlmtune convert pth_2_hf a.pth out
vlmtune data check x.json --image-folder imgs --not-a-data-flag
vlmtune chat llm --llava hf --prompt-template internlm3_chat
```
Inline: `vlmtune mmbench llm --data-path x.tsv --matchr xtuner` and `vlmtune copy-cfg NAME dir`, prose
`llava_foo_7b_clip_e1_gpu8_pretrain`, `prompt_template = 'qwen9_chat'`, `--is-clp`, [ok](real.md), [bad](missing.md),
![plot](images/none.png), <img src="nope.png">, scripts/no_such_script.sh, docs/en/nothing.md, and
`vlmtune chat llm --image a.jpg` and `vlmtune mmbench llm --data-path t.tsv --[no-]pad-image-to-square` are fine.
"""
    problems = "\n".join(check_markdown(page, tmp_path, "synthetic.md"))
    expected = ["`vlmtune trian` is not a subcommand", "config 'tiny_llava_pretrian' after `vlmtune train`",
                "`vlmtune train` has no option --no-such-flag", "`vlmtune convert pth_2_hf` is not an action",
                "`vlmtune data check` has no option --not-a-data-flag", "prompt template 'internlm3_chat'",
                "`vlmtune mmbench` has no option --matchr", "config name llava_foo_7b_clip_e1_gpu8_pretrain",
                "prompt template 'qwen9_chat'", "link or image missing.md", "link or image images/none.png",
                "link or image nope.png", "path scripts/no_such_script.sh", "path docs/en/nothing.md",
                "no vlmtune command has the option --is-clp"]
    for message in expected:
        assert message in problems, f"the checker missed: {message}\n{problems}"
    assert problems.count("\n") + 1 == len(expected), problems  # and nothing else (the fine ones pass)


def sections(text: str) -> list[str]:
    return [line for line in split_code(text)[1].splitlines() if line.startswith("## ")]


def test_guides_have_the_same_structure():
    en, zh = DOCS / "en", DOCS / "zh_cn"
    names = sorted(p.name for p in en.glob("*.md"))
    assert names and names == sorted(p.name for p in zh.glob("*.md"))
    for name in names:
        a, b = (en / name).read_text(encoding="utf-8"), (zh / name).read_text(encoding="utf-8")
        assert len(sections(a)) == len(sections(b)), f"{name}: {len(sections(a))} vs {len(sections(b))} `##` sections"
        images = [sorted(LINK.findall(t) + IMG_TAG.findall(t)) for t in (a, b)]
        images = [[i for i in found if "images/" in i] for found in images]
        assert images[0] == images[1], f"{name}: different images {images}"
        assert len(split_code(a)[0]) == len(split_code(b)[0]), f"{name}: different numbers of code blocks"


def test_readme_set_up_commands_are_what_ci_and_the_quickstart_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    part = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    block = split_code(part)[0][0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == "bash scripts/test.sh"
    test_sh = (ROOT / "scripts/test.sh").read_text()
    assert 'source "$ROOT/scripts/setup_env.sh"' in test_sh and "pytest tests" in test_sh
    quickstart = (ROOT / "scripts/quickstart.sh").read_text()
    assert 'source "$ROOT/scripts/setup_env.sh"' in quickstart  # installs into .venv first
    for step in ("make-tiny", "data check", "train tiny_llava_task_pretrain", "train tiny_llava_task_finetune_qlora",
                 "convert pth_to_hf", "--save-format huggingface", "convert merge", "--is-clip", "chat", "mmbench"):
        assert f"vlmtune {step}" in quickstart or step in quickstart, step
