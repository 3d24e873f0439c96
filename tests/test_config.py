"""Config files: validation errors that name key and file, _base_ inheritance, overrides, shipped configs."""
from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from vlmtune.config import CONFIG_DIR, config_from_text, list_configs, load_config, resolve_config_path
from vlmtune.data.templates import TEMPLATES
from vlmtune.errors import UserError

MINIMAL = """
llm_name_or_path = 'llm'
visual_encoder_name_or_path = 'clip'
data_path = 'data.json'
image_folder = 'images'
prompt_template = 'vicuna'
"""


def write(folder, name, body):
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def test_minimal_config_fills_defaults(tmp_path):
    cfg = load_config(str(write(tmp_path, "mine.py", MINIMAL)))
    assert cfg.name == "mine" and cfg.path == str(tmp_path / "mine.py")
    assert cfg.model.llm_name_or_path == "llm" and cfg.model.visual_select_layer == -2 and cfg.model.freeze_llm
    assert cfg.data.prompt_template == "vicuna" and cfg.data.max_length == 2048
    assert cfg.train.lr == 2e-4 and cfg.train.betas == (0.9, 0.999)


def test_unknown_key_names_key_file_and_close_match(tmp_path):
    path = write(tmp_path, "typo.py", MINIMAL + "max_lenght = 1024\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    message = str(e.value)
    assert str(path) in message and "'max_lenght'" in message and "did you mean 'max_length'" in message


@pytest.mark.parametrize(
    "line,key,expected",
    [
        ("batch_size = '8'", "batch_size", "int"),
        ("freeze_llm = 1", "freeze_llm", "bool"),  # ints are not booleans
        ("batch_size = True", "batch_size", "int"),  # and booleans are not ints
        ("betas = (0.9,)", "betas", "tuple"),
        ("evaluation_inputs = 'Describe.'", "evaluation_inputs", "list"),
        ("llm_lora = 8", "llm_lora", "dict"),
    ],
)
def test_wrong_type_names_key_and_type(tmp_path, line, key, expected):
    path = write(tmp_path, "bad.py", MINIMAL + line + "\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and repr(key) in str(e.value) and expected in str(e.value)


@pytest.mark.parametrize("line,key", [("attn_implementation = 'flash'", "attn_implementation"),
                                      ("image_preprocess = 'torch'", "image_preprocess")])
def test_fixed_choice_keys_name_the_allowed_values(tmp_path, line, key):
    path = write(tmp_path, "bad.py", MINIMAL + line + "\n")
    with pytest.raises(UserError, match=f"{key!r} should be one of"):
        load_config(str(path))


def test_choice_keys_accept_none_and_listed_values(tmp_path):
    path = write(tmp_path, "ok.py", MINIMAL + "attn_implementation = 'eager'\nlazy_tokenize = None\n")
    cfg = load_config(str(path))
    assert (cfg.model.attn_implementation, cfg.data.lazy_tokenize) == ("eager", None)
    assert load_config(str(write(tmp_path, "d.py", MINIMAL))).model.attn_implementation is None


GRID = "image_grid_pinpoints = [(336, 672), (672, 336)]\n"


@pytest.mark.parametrize("lines,ratio", [
    ("", "square"),
    ("pad_image_to_square = True\n", "pad"),  # XTuner's key: the alias of LLaVA's 'pad'
    ("pad_image_to_square = False\n", "square"),
    ("image_aspect_ratio = 'pad'\n", "pad"),
    ("image_aspect_ratio = 'pad'\npad_image_to_square = True\n", "pad"),
    ("image_aspect_ratio = 'square'\npad_image_to_square = False\n", "square"),
    (GRID, "anyres"),  # transformers' LlavaNextConfig names only the grid
    ("image_aspect_ratio = 'anyres'\n" + GRID, "anyres"),
    ("image_aspect_ratio = 'anyres'\npad_image_to_square = False\n" + GRID, "anyres"),  # False does not contradict
])
def test_image_aspect_ratio_resolves_the_keys_that_agree(tmp_path, lines, ratio):
    cfg = load_config(str(write(tmp_path, "ok.py", MINIMAL + lines)))
    assert cfg.data.image_aspect_ratio == ratio
    assert cfg.data.pad_image_to_square == (ratio == "pad")
    assert (cfg.model.image_grid_pinpoints is not None) == (ratio == "anyres")


@pytest.mark.parametrize("lines,expected", [
    ("image_aspect_ratio = 'pad'\npad_image_to_square = False\n", "pad_image_to_square=False and image_aspect_ratio='pad'"),
    ("image_aspect_ratio = 'square'\npad_image_to_square = True\n", "pad_image_to_square=True and image_aspect_ratio='square'"),
    ("pad_image_to_square = True\n" + GRID, "pad_image_to_square=True and image_grid_pinpoints (AnyRes)"),
    ("image_aspect_ratio = 'pad'\n" + GRID, "image_grid_pinpoints (AnyRes) and image_aspect_ratio='pad'"),
    ("image_aspect_ratio = 'anyres'\n", "image_aspect_ratio='anyres' tiles images into the grids"),
    ("image_aspect_ratio = 'anyres_max_9'\n", "'image_aspect_ratio' should be one of square, pad, anyres"),
])
def test_image_aspect_ratio_keys_that_disagree_fail_at_load(tmp_path, lines, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        load_config(str(write(tmp_path, "bad.py", MINIMAL + lines)))


def test_lazy_tokenize_with_packing_is_refused_at_load(tmp_path):
    path = write(tmp_path, "pack.py", MINIMAL + "pack_to_max_length = True\nlazy_tokenize = True\n")
    with pytest.raises(UserError, match="pack_to_max_length needs exact lengths.*remove lazy_tokenize=True"):
        load_config(str(path))


def test_lenient_conversions(tmp_path):
    path = write(tmp_path, "ok.py", MINIMAL + "lr = 1\nbetas = [0.9, 0.95]\nllm_lora = None\nmax_steps = None\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.9, 0.95) and cfg.model.llm_lora is None and cfg.train.max_steps is None


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "short.py", MINIMAL.replace("prompt_template = 'vicuna'\n", ""))
    with pytest.raises(UserError, match="required config key 'prompt_template' is missing"):
        load_config(str(path))


def test_syntax_error_is_a_user_error(tmp_path):
    path = write(tmp_path, "broken.py", MINIMAL + "lr = (\n")
    with pytest.raises(UserError, match="cannot load config"):
        load_config(str(path))


def test_base_inheritance_overrides_and_merges_dicts(tmp_path):
    write(tmp_path, "base.py", MINIMAL + "lr = 1e-3\nllm_lora = dict(r=8, lora_alpha=16)\n")
    child = write(tmp_path, "child.py", """
        _base_ = ['./base.py']
        lr = 2e-5
        llm_lora = dict(r=64)
        batch_size = 4
    """)
    cfg = load_config(str(child))
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.prompt_template) == (2e-5, 4, "vicuna")
    assert cfg.model.llm_lora == {"r": 64, "lora_alpha": 16}  # mmengine merges dicts key by key
    assert cfg.name == "child"


def test_cfg_options_override_values_nested_keys_and_are_validated(tmp_path):
    path = write(tmp_path, "base.py", MINIMAL + "llm_lora = dict(r=8, lora_alpha=16)\n")
    cfg = load_config(str(path), {"lr": 5e-4, "batch_size": 3, "llm_lora.r": 32, "prompt_template": "plain"})
    assert (cfg.train.lr, cfg.train.batch_size, cfg.data.prompt_template) == (5e-4, 3, "plain")
    assert cfg.model.llm_lora == {"r": 32, "lora_alpha": 16}
    with pytest.raises(UserError, match="unknown config key 'bacth_size'.*did you mean 'batch_size'"):
        load_config(str(path), {"bacth_size": 3})
    with pytest.raises(UserError, match="'lr' should be float"):
        load_config(str(path), {"lr": "fast"})


def test_saved_text_round_trips(tmp_path):
    cfg = load_config(str(write(tmp_path, "mine.py", MINIMAL + "llm_lora = dict(r=8)\nbetas = (0.9, 0.95)\n")))
    again = config_from_text(cfg.text, "work_dir/mine.py")
    assert (again.model, again.data, again.train) == (cfg.model, cfg.data, cfg.train)


# ---- shipped configs


def test_list_configs_lists_shipped_files_sorted_and_filters():
    names = list_configs()
    assert names == sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
    assert {"tiny_llava_pretrain", "tiny_llava_finetune_lora", "tiny_llava_finetune_qlora"} <= set(names)
    assert list_configs("QLORA") == [n for n in names if "qlora" in n] and "tiny_llava_finetune_qlora" in list_configs("QLORA")
    assert list_configs("no-such-config") == []


def test_every_shipped_config_loads_with_a_known_template(tiny):
    for name in list_configs():
        assert resolve_config_path(name) == CONFIG_DIR / f"{name}.py"
        assert resolve_config_path(f"{name}.py") == CONFIG_DIR / f"{name}.py"
        cfg = load_config(name)
        assert cfg.name == name and cfg.data.prompt_template in TEMPLATES, name


def test_tiny_configs_point_at_the_tiny_models_and_inherit(tiny):
    pretrain = load_config("tiny_llava_pretrain")
    assert pretrain.model.llm_name_or_path == f"{tiny.root}/llm"
    assert pretrain.model.visual_encoder_name_or_path == f"{tiny.root}/clip"
    assert pretrain.data.data_path == f"{tiny.root}/data/pretrain.json"
    qlora = load_config("tiny_llava_finetune_qlora")  # qlora <- lora <- pretrain
    assert qlora.model.quantization == "4bit" and qlora.model.llm_lora is not None
    assert qlora.data.data_path == f"{tiny.root}/data/finetune.json" and qlora.data.image_folder == pretrain.data.image_folder


def test_unknown_config_name_suggests_close_ones():
    with pytest.raises(UserError, match="did you mean tiny_llava_pretrain"):
        resolve_config_path("tiny_llava_pretrian")
    with pytest.raises(UserError, match="list-cfg"):
        resolve_config_path("zzzz")


def test_the_configs_users_see_are_the_ones_read():
    """One source: the top-level configs/ folder is what vlmtune/configs (CONFIG_DIR, a link to it) reads."""
    repo = Path(__file__).resolve().parents[1]
    assert (repo / "vlmtune" / "configs").is_symlink()
    assert CONFIG_DIR.resolve() == (repo / "configs").resolve()
    shown = sorted(p.name for p in (repo / "configs").glob("*.py"))
    assert sorted(f"{name}.py" for name in list_configs()) == [n for n in shown if not n.startswith("_")]


@pytest.mark.parametrize(
    "value,expected",
    [
        ("dict(data_path='MME.tsv')", "config key 'evaluation_benchmarks' should be a list"),
        ("['MME.tsv']", "evaluation_benchmarks[0] should be dict(data_path=..., max_rows=...), got 'MME.tsv'"),
        ("[dict(data_path='MME.tsv', max_row=5)]", "evaluation_benchmarks[0]: unknown key 'max_row' (did you mean 'max_rows'?)"),
        ("[dict(max_rows=5)]", "evaluation_benchmarks[0]: 'data_path' (the benchmark's TSV) is required"),
        ("[dict(data_path='a.tsv'), dict(data_path='MME.tsv', max_rows=0)]",
         "evaluation_benchmarks[1]: 'max_rows' should be a positive int (or None for every row), got 0"),
        ("[dict(data_path='MME.tsv', max_rows='5')]", "'max_rows' should be a positive int (or None for every row), got '5'"),
        ("[dict(data_path='MME.tsv', max_rows=True)]", "'max_rows' should be a positive int (or None for every row), got True"),
        ("[dict(data_path='MME.tsv', dataset=3)]", "'dataset' should be a VLMEvalKit benchmark name, got 3"),
    ],
)
def test_a_bad_evaluation_benchmarks_entry_is_one_line_naming_config_and_entry(tmp_path, value, expected):
    path = write(tmp_path, "bad.py", MINIMAL + f"evaluation_benchmarks = {value}\n")
    with pytest.raises(UserError) as e:
        load_config(str(path))
    assert str(e.value).startswith(f"{path}: ") and expected in str(e.value) and "\n" not in str(e.value)


def test_evaluation_benchmarks_entries_are_typed_and_survive_the_saved_config(tmp_path):
    body = MINIMAL + "evaluation_benchmarks = [dict(data_path='MME.tsv', max_rows=50), dict(data_path='x.tsv', dataset='POPE')]\n"
    cfg = load_config(str(write(tmp_path, "ok.py", body)))
    assert [(b.data_path, b.max_rows, b.dataset) for b in cfg.train.evaluation_benchmarks] == [
        ("MME.tsv", 50, None), ("x.tsv", None, "POPE")]
    assert config_from_text(cfg.text, "saved.py").train.evaluation_benchmarks == cfg.train.evaluation_benchmarks
    assert load_config(str(write(tmp_path, "none.py", MINIMAL))).train.evaluation_benchmarks == []
