"""Config files: Python files of plain values, loaded with mmengine's Config, validated once into dataclasses.

A config is given by path or by the name of a file shipped in configs/. mmengine gives `_base_` inheritance,
`{{$ENV:default}}` substitution and `--cfg-options key=value` overrides; everything after loading is typed.
Unknown keys and wrong types are errors that name the key and the file.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class ModelConfig:
    """What to assemble: the LLM, the CLIP encoder, the projector, and what of them trains."""

    llm_name_or_path: str
    visual_encoder_name_or_path: str
    visual_select_layer: int = -2
    # transformers' names: 'default' drops the encoder's CLS token (CLIP, LLaVA-1.5), 'full' keeps every token
    # (SigLIP has no CLS); None = 'default' for an encoder with a CLS token, 'full' for one without
    vision_feature_select_strategy: str | None = None
    # AnyRes (LLaVA-NeXT): the (height, width) grids an image may be tiled into, multiples of the encoder's image
    # size, e.g. [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]; None = one square image
    image_grid_pinpoints: list[tuple[int, int]] | None = None
    projector_depth: int = 2
    freeze_llm: bool = True
    freeze_visual_encoder: bool = True
    llm_lora: dict | None = None  # peft LoraConfig kwargs, e.g. dict(r=512, lora_alpha=256, lora_dropout=0.05)
    visual_encoder_lora: dict | None = None
    quantization: str | None = None  # None, "4bit" (QLoRA nf4) or "8bit"
    torch_dtype: str = "auto"  # auto = bf16 where supported, else fp16 on GPU / fp32 on CPU
    trust_remote_code: bool = False
    use_gradient_checkpointing: bool = True
    # the LLM's attention kernel (transformers' `attn_implementation`); None = transformers' default (sdpa).
    # With pack_to_max_length, flash_attention_2/3 run varlen (only in-sample pairs), sdpa/eager a block mask.
    attn_implementation: str | None = None


@dataclass
class DataConfig:
    """Where the data is and how it becomes tokens and pixels."""

    data_path: str
    image_folder: str
    prompt_template: str
    max_length: int = 2048  # counts each image as the tokens it expands to (576 for CLIP-L/336)
    # LLaVA's image_aspect_ratio: 'square' (the encoder's resize and crop), 'pad' (to a square in the mean colour
    # first, LLaVA-1.5), 'anyres' (LLaVA-NeXT tiles, with image_grid_pinpoints). None = what the two keys below
    # say; `_aspect_ratio` resolves all three at load, so the others agree with it afterwards
    image_aspect_ratio: str | None = None
    pad_image_to_square: bool = False  # XTuner's name for image_aspect_ratio='pad'
    image_preprocess: str = "hf"  # "hf" (the encoder's image processor itself, bit-exact with transformers/XTuner) or "fast" (torch; speed in docs/benchmarks.md)
    system: str = ""
    group_by_length: bool = True  # modality-aware length grouping, as LLaVA/XTuner
    pack_to_max_length: bool = False  # several whole samples per micro-batch, one sequence (data/sampler.py)
    max_packed_length: int | None = None  # tokens per packed micro-batch; default batch_size * max_length
    # tokenize in the dataloader (LLaVA's LazySupervisedDataset) with estimated lengths for grouping, instead of
    # all records up front into the cache; None = lazy unless pack_to_max_length (packing needs exact lengths)
    lazy_tokenize: bool | None = None
    max_bad_sample_fraction: float = 0.001  # stop the run when more samples than this are skipped
    allowed_image_roots: list[str] = field(default_factory=list)
    cache_dir: str | None = None  # tokenization cache; default <work_dir>/../.cache/vlmtune
    data_root: str = ""  # XTuner's helper for composing paths inside the config; not used after loading


@dataclass(frozen=True)
class BenchmarkEntry:
    """One `evaluation_benchmarks` entry: a VLMEvalKit TSV scored during training (eval/in_training.py)."""

    data_path: str
    max_rows: int | None = None  # the first N rows the benchmark asks, in file order; None = every row
    dataset: str | None = None  # VLMEvalKit's name when the file name does not say it (`vlmtune eval --dataset`)


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpoints, logging and in-training evaluation."""

    batch_size: int = 1  # per device
    accumulative_counts: int = 1
    dataloader_num_workers: int = 0
    max_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides max_epochs when set
    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    max_norm: float = 1.0
    warmup_ratio: float = 0.03
    save_steps: int = 500
    save_total_limit: int = 2
    logging_interval: int = 10
    record_sample_ids: bool = False  # every step's sample ids to work_dir/sample_ids.jsonl (audit the data order)
    seed: int = 42
    pretrained_pth: str | None = None
    evaluation_freq: int = 500
    evaluation_images: list[str] = field(default_factory=list)
    evaluation_inputs: list[str] = field(default_factory=list)
    evaluation_max_new_tokens: int = 64
    # benchmark subsets scored every evaluation_freq steps, e.g. [dict(data_path='MME.tsv', max_rows=200)]
    evaluation_benchmarks: list[BenchmarkEntry] = field(default_factory=list)


@dataclass
class Config:
    """The whole validated config, plus where it came from and its resolved text (saved with checkpoints)."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    name: str
    path: str
    text: str

    @property
    def micro_batch(self) -> int:
        """What one rank's micro-batch holds: batch_size samples, or one pack with pack_to_max_length."""
        return 1 if self.data.pack_to_max_length else self.train.batch_size

    def work_dir(self, given: str | None) -> Path:
        """The run's work dir: `--work-dir`, else ./work_dirs/<config name> (XTuner's default)."""
        return Path(given or Path("work_dirs") / self.name)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
CHOICES = {  # string keys with a fixed set of values
    "image_preprocess": ("fast", "hf"),
    "image_aspect_ratio": ("square", "pad", "anyres"),
    "vision_feature_select_strategy": ("default", "full"),
    "attn_implementation": ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"),
}


def find_file(name_or_path: str, folder: Path, suffix: str) -> Path | None:
    """`name_or_path` as a file, else the shipped `folder/<name><suffix>`, else None."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = folder / f"{name_or_path.removesuffix(suffix)}{suffix}"
    return shipped if shipped.is_file() else None


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given, or the shipped configs/<name>.py; a user error with close names otherwise."""
    path = find_file(name_or_path, CONFIG_DIR, ".py")
    if path is not None:
        return path
    close = difflib.get_close_matches(name_or_path, list_configs(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `vlmtune list-cfg` lists the shipped ones"
    raise UserError(f"config {name_or_path!r} is neither a file nor a shipped config{hint}")


def list_configs(pattern: str | None = None) -> list[str]:
    """Names of shipped configs (without .py), optionally those containing `pattern`."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.name.startswith("_"))
    return [n for n in names if pattern is None or pattern.lower() in n.lower()]


def parse_cfg_options(options: list[str]) -> dict:
    """`--cfg-options key=value ...`: values are Python literals when they parse as one (`{'r': 8}`, `(0.9, 0.99)`),
    strings otherwise; dotted keys (`llm_lora.r=8`) set one entry of a dict value, as in mmengine."""
    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--cfg-options {item!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def load_config(name_or_path: str, cfg_options: dict | None = None) -> Config:
    """Load, apply overrides, validate. The only place a config file is read."""
    from mmengine.config import Config as MMConfig
    from mmengine.logging import MMLogger

    MMLogger.get_current_instance().setLevel("WARNING")  # mmengine announces every {{$ENV}} substitution at INFO
    path = resolve_config_path(name_or_path)
    try:
        raw = MMConfig.fromfile(str(path))
    except Exception as e:  # syntax errors, missing _base_ files: the user's file, not our bug
        raise UserError(f"{path}: cannot load config: {e}") from None
    if cfg_options:
        raw.merge_from_dict(cfg_options)
    values = {k: v for k, v in raw.to_dict().items() if not k.startswith("_")}
    return Config(
        **_validate(values, path), name=path.stem, path=str(path), text=_dump_text(raw, path)
    )


def config_from_text(text: str, source: str, name: str | None = None) -> Config:
    """Rebuild a Config from the text saved in a checkpoint or a converted folder (`source` names that file).

    That text came from somewhere else (a downloaded iter_N.pth, a --llava folder), so it is data, never
    executed: only `NAME = <literal>` lines, as `_dump_text` writes them, are read (see `read_literal_assignments`).
    """
    if not isinstance(text, str):
        raise UserError(f"{source}: its saved config is {type(text).__name__}, not text; pass the training config file")
    values = read_literal_assignments(text, source)
    saved_name = values.pop("config_name", None)
    name = name or (saved_name if isinstance(saved_name, str) else Path(source).stem)
    return Config(**_validate(values, Path(source)), name=name, path=source, text=text)


def read_literal_assignments(text: str, source: str) -> dict:
    """{NAME: value} of a module made only of `NAME = <Python literal>` statements, parsed with `ast` and
    `ast.literal_eval`: nothing in it runs. Anything else (an import, a call, an expression, `a.b = 1`) is a
    user error naming `source` and the line."""
    try:
        tree = ast.parse(text, filename=source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise UserError(f"{source}: not a saved vlmtune config ({type(e).__name__}: {e}); re-create it with "
                        f"`vlmtune convert pth_to_hf`, or pass the training config file") from None
    values = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise UserError(f"{source}: line {node.lineno}: refused to read: a saved config holds only "
                            f"`NAME = <literal>` lines and is never executed (found {type(node).__name__}); "
                            "re-create it with `vlmtune convert pth_to_hf`, or pass the training config file")
        try:
            values[target.id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise UserError(f"{source}: line {node.lineno}: refused to read {target.id!r}: its value is not a "
                            "Python literal (a saved config is data and is never executed); re-create it with "
                            "`vlmtune convert pth_to_hf`, or pass the training config file") from None
    return values


def _dump_text(raw, path: Path) -> str:
    """Resolved config as Python text: plain values only, so it round-trips through `config_from_text`
    (checked here, at load, rather than when a checkpoint is read back)."""
    lines = []
    for key, value in raw.to_dict().items():
        if key.startswith("_"):
            continue
        try:
            same = ast.literal_eval(repr(value)) == value
        except (ValueError, SyntaxError, TypeError):
            same = False
        if not same:
            raise UserError(f"{path}: config key {key!r} = {value!r} is not a plain Python literal (strings, numbers, "
                            "lists, dicts); checkpoints store the config as data")
        lines.append(f"{key} = {value!r}\n")
    return "".join(lines)


def _validate(values: dict, path: Path) -> dict:
    """Split flat keys into the section dataclasses, checking names, required keys and types."""
    known = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known and key != "config_name":
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{path}: unknown config key {key!r}{hint}")
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "evaluation_benchmarks" and f.name in values:
                kwargs[f.name] = _benchmark_entries(values[f.name], path)
            elif f.name in values:
                kwargs[f.name] = _check_type(values[f.name], hints[f.name], f.name, path)
                if f.name in CHOICES and kwargs[f.name] is not None and kwargs[f.name] not in CHOICES[f.name]:
                    raise UserError(f"{path}: config key {f.name!r} should be one of {', '.join(CHOICES[f.name])}, got {kwargs[f.name]!r}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise UserError(f"{path}: required config key {f.name!r} is missing")
        out[section] = cls(**kwargs)
    _aspect_ratio(out["model"], out["data"], "pad_image_to_square" in values, path)
    if out["model"].image_grid_pinpoints is not None:
        _check_anyres(out["model"], out["data"], path)
    if out["data"].lazy_tokenize and out["data"].pack_to_max_length:
        raise UserError(f"{path}: pack_to_max_length needs exact lengths, so records are tokenized up front; "
                        f"remove lazy_tokenize=True (or set it False)")
    return out


def _benchmark_entries(value, path: Path) -> list[BenchmarkEntry]:
    """`evaluation_benchmarks`: a list of dict(data_path=..., max_rows=..., dataset=...); a bad entry is one line
    naming its position. The files are read before the run starts (paths.check_config_paths)."""
    if not isinstance(value, (list, tuple)):
        raise UserError(f"{path}: config key 'evaluation_benchmarks' should be a list of "
                        f"dict(data_path=..., max_rows=...), got {value!r}")
    fields = {f.name for f in dataclasses.fields(BenchmarkEntry)}
    entries = []
    for i, entry in enumerate(value):
        where = f"{path}: evaluation_benchmarks[{i}]"
        if isinstance(entry, BenchmarkEntry):  # already validated (a Config built in code)
            entry = dataclasses.asdict(entry)
        if not isinstance(entry, dict):
            raise UserError(f"{where} should be dict(data_path=..., max_rows=...), got {entry!r}")
        unknown = sorted(set(entry) - fields)
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), sorted(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{where}: unknown key {unknown[0]!r}{hint}; an entry takes {', '.join(sorted(fields))}")
        if not isinstance(entry.get("data_path"), str) or not entry["data_path"]:
            raise UserError(f"{where}: 'data_path' (the benchmark's TSV) is required, got {entry.get('data_path')!r}")
        rows = entry.get("max_rows")
        if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
            raise UserError(f"{where}: 'max_rows' should be a positive int (or None for every row), got {rows!r}")
        dataset = entry.get("dataset")
        if dataset is not None and (not isinstance(dataset, str) or not dataset):
            raise UserError(f"{where}: 'dataset' should be a VLMEvalKit benchmark name, got {dataset!r}")
        entries.append(BenchmarkEntry(entry["data_path"], rows, dataset))
    return entries


def _aspect_ratio(model: ModelConfig, data: DataConfig, pad_given: bool, path: Path) -> None:
    """Resolve how images are fed into `data.image_aspect_ratio`, with `pad_image_to_square` (its 'pad' alias)
    and `image_grid_pinpoints` ('anyres') set to agree. One key decides; keys set to disagreeing values, or
    'anyres' without pinpoints, are one-line errors."""
    ratio, pinpoints = data.image_aspect_ratio, model.image_grid_pinpoints
    said = {}  # key -> the values of image_aspect_ratio it allows
    if pad_given or data.pad_image_to_square:
        said["pad_image_to_square"] = {"pad"} if data.pad_image_to_square else {"square", "anyres"}
    if pinpoints is not None:
        said["image_grid_pinpoints"] = {"anyres"}
    if ratio is not None:
        said["image_aspect_ratio"] = {ratio}
    allowed = set.intersection({"square", "pad", "anyres"}, *said.values())
    if not allowed:
        meaning = {"pad_image_to_square": f"={data.pad_image_to_square}", "image_grid_pinpoints": " (AnyRes)",
                   "image_aspect_ratio": f"={ratio!r}"}
        raise UserError(f"{path}: {' and '.join(k + meaning[k] for k in said)} disagree; keep one (image_aspect_ratio "
                        f"decides: 'square', 'pad', or 'anyres' with image_grid_pinpoints)")
    ratio = next(iter(allowed)) if len(allowed) == 1 else "square"
    if ratio == "anyres" and pinpoints is None:
        raise UserError(f"{path}: image_aspect_ratio='anyres' tiles images into the grids image_grid_pinpoints lists; "
                        "set it, e.g. image_grid_pinpoints=[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]")
    data.image_aspect_ratio, data.pad_image_to_square = ratio, ratio == "pad"


def _check_anyres(model: ModelConfig, data: DataConfig, path: Path) -> None:
    """AnyRes settings that contradict each other fail at load (the pinpoints against the encoder: at build)."""
    if not model.image_grid_pinpoints or any(min(p) <= 0 for p in model.image_grid_pinpoints):
        raise UserError(f"{path}: image_grid_pinpoints should list positive (height, width) grids, e.g. "
                        f"[(336, 672), (672, 336), (672, 672)], got {model.image_grid_pinpoints!r}")
    if data.image_preprocess != "hf":
        raise UserError(f"{path}: image_grid_pinpoints (AnyRes) preprocesses with transformers' LlavaNext image "
                        f"processor; set image_preprocess='hf'")


def _check_type(value, hint, key: str, path: Path):
    """`value` converted to `hint` (int->float, list->tuple allowed); a user error naming the key otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check_type(value, next(a for a in args if a is not type(None)), key, path)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(_check_type(v, a, key, path) for v, a in zip(value, args))
    if origin is list and isinstance(value, (list, tuple)):
        return [_check_type(v, args[0], key, path) for v in value]
    expected = origin or hint  # a generic reaching here does not fit: wrong-length tuple, non-sequence list
    if origin is None and isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return dict(value) if expected is dict else value
    raise UserError(f"{path}: config key {key!r} should be {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    """Readable name of a type hint for error messages."""
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
