"""Reading weights from files that came from elsewhere: nothing in them runs, and no key is dropped.

Everything is read with torch's weights-only unpickler or safetensors. The files read here:
    iter_N.pth (vlmtune)      {"format", "state_dict", "config_text", "config_name", "step", "trainer_state"}
    iter_N.pth (XTuner/mmengine, one file)  {"meta" (meta["cfg"]: XTuner's Python config), "state_dict",
                              "message_hub" (mmengine HistoryBuffers, numpy arrays), "optimizer", "param_schedulers"}
    iter_N.ds/ckpt/ (vlmtune) and iter_N.pth/ (XTuner under DeepSpeed): DeepSpeed's mp_rank_00_model_states.pt,
                              {"module", "param_shapes", ..., + the client state of either tool}
    a bare {name: tensor} file, weight folders (safetensors, sharded or not, or pytorch_model.bin)
The objects of mmengine's logging state are never built: each global the XTuner files reference besides
tensors is replaced by an inert stand-in (`_Discarded`), so neither mmengine, numpy nor `getattr` runs. A
config stored with a checkpoint is data (config.config_from_text); XTuner's Python config is not read at all.

Names: trained weights are returned by LlavaModel parameter name. Both vlmtune's and XTuner's names are read
(keymaps.XTUNER_STATE_DICT: XTuner's transformers 4.x CLIP has a `vision_model.` level), by `rename_either`.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

from vlmtune.config import Config, config_from_text
from vlmtune.convert import keymaps
from vlmtune.errors import UserError

FORMAT = "vlmtune-ckpt-v1"
DS_TAG = "ckpt"  # the tag of vlmtune's DeepSpeed folders: iter_N.ds/ckpt/
MODEL_STATES = "mp_rank_00_model_states.pt"


class _Discarded:
    """Stands in for every non-tensor object of an XTuner checkpoint's logging state: built from the pickle's
    data without running anything, then dropped with the rest of `message_hub`."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _discard(*args, **kwargs) -> _Discarded:
    return _Discarded()


# The globals an mmengine/XTuner iter_N.pth references besides torch's own (found by reading the real files
# with torch.serialization.get_unsafe_globals_in_checkpoint; numpy 1.x and 2.x spell numpy's module apart).
_XTUNER_LOGGING_GLOBALS = [
    (_Discarded, "mmengine.logging.history_buffer.HistoryBuffer"), (_Discarded, "numpy.ndarray"),
    (_discard, "numpy.dtype"), (_discard, "builtins.getattr"),
    *((_discard, f"numpy.{core}.multiarray.{name}") for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
]


def safe_load(path: Path, map_location="cpu", allowed: list = (), mmap: bool = False) -> dict:
    """torch.load with weights_only=True (plus the `allowed` globals); anything needing code is refused.
    `mmap`: tensors are mapped, not read (a look at a large checkpoint's keys, shapes or trainer state)."""
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file contains pickled code or objects, not only weights "
                        f"({str(e).splitlines()[0][:200]}); only load checkpoints you trust") from None
    except (RuntimeError, EOFError) as e:
        raise UserError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None


def deepspeed_safe_load(path, map_location=None, **_) -> dict:
    """Load a DeepSpeed shard with weights_only=True, allowing only the plain data classes DeepSpeed stores
    in optimizer states (its loss scaler, the ZeRO stage enum, fragment addresses); any other pickled
    object is refused. Extra torch.load arguments DeepSpeed passes (`weights_only=False`, `mmap`) are dropped."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return safe_load(Path(path), map_location, allowed=[LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


class _SafeTorch:
    """torch, as a DeepSpeed module sees it while vlmtune runs it (`safe_torch_load_in`): every `load` goes
    through `load` (`deepspeed_safe_load` or a stricter reader built on it; DeepSpeed's checkpoint tools
    unpickle with weights_only=False)."""

    def __init__(self, load):
        self.load = load

    def __getattr__(self, name: str):
        return getattr(torch, name)


@contextlib.contextmanager
def safe_torch_load_in(*modules, load=deepspeed_safe_load):
    """While the block runs, the `torch` that each of these DeepSpeed modules imported is `_SafeTorch`: their
    torch.load calls read weights and DeepSpeed's plain data classes, and refuse anything else (a hostile
    checkpoint cannot run code through DeepSpeed's zero_to_fp32, ds_to_universal or universal loader)."""
    real = [m.torch for m in modules]
    for m in modules:
        m.torch = _SafeTorch(load)
    try:
        yield
    finally:
        for m, t in zip(modules, real):
            m.torch = t


def read_weights_file(folder: Path, stems: tuple[str, ...] = ("model", "pytorch_model")) -> dict[str, torch.Tensor]:
    """All tensors of a weights folder: `<stem>.safetensors` (or its sharded index), else `<stem>.bin`."""
    from safetensors.torch import load_file

    for stem in stems:
        if (folder / f"{stem}.safetensors").is_file():
            return load_file(str(folder / f"{stem}.safetensors"))
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(str(folder / Path(shard).name)).items()}
    for stem in stems:
        if (folder / f"{stem}.bin").is_file():
            return safe_load(folder / f"{stem}.bin")
    raise UserError(f"{folder}: no weights ({' / '.join(f'{s}.safetensors' for s in stems)} or .bin)")


def rename(state_dict: dict[str, torch.Tensor], rules, reverse: bool = False) -> dict[str, torch.Tensor]:
    """Keys renamed by the longest matching (ours, theirs) prefix rule of keymaps.py (theirs -> ours with
    `reverse`); a key no rule matches is an error."""
    pairs = [(b, a) if reverse else (a, b) for a, b in rules]
    pairs.sort(key=lambda pair: len(pair[0]), reverse=True)
    out = {}
    for key, value in state_dict.items():
        match = next(((src, dst) for src, dst in pairs if key.startswith(src)), None)
        if match is None:
            raise UserError(f"no key map rule for weight {key!r}: this model's module names are not supported "
                            "by this layout (--save-format xtuner takes any LLM)")
        out[match[1] + key[len(match[0]):]] = value
    return out


def rename_either(state_dict: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Keys in either naming of `rules` (ours or theirs) -> ours; a key neither side knows is an error."""
    return rename(state_dict, [*((theirs, ours) for ours, theirs in rules), *((ours, ours) for ours, _ in rules)])


def save_model_renamed(model, folder: Path, rules, max_shard_size: str = "2GB") -> None:
    """`model.save_pretrained`, with the weights' keys renamed by `rules` (a CLIP vision tower is written with
    transformers 4.x's `vision_model.` level, keymaps.CLIP_VISION_MODEL, so XTuner and LLaVA read it)."""
    from huggingface_hub import save_torch_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = {k: v.detach().contiguous() for k, v in rename(model.state_dict(), rules).items()}
    save_torch_state_dict(state, str(folder), max_shard_size=max_shard_size)


# Files a tokenizer is made of on the hub (SentencePiece, BPE, WordPiece, tiktoken, and remote-code classes).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json")
TOKENIZER_PATTERNS = ("*.tiktoken", "tokenization_*.py")


def save_llm(llm, tokenizer_source: str, folder: Path, max_shard_size: str = "2GB") -> None:
    """An LLM folder that transformers 4.x (XTuner, LLaVA) reads as well as 5.x: `save_pretrained`, `rope_theta`
    also at the top level of config.json (5.x keeps it only under `rope_parameters`, which 4.x ignores: it would
    silently fall back to 10000), and the tokenizer's own files copied from the LLM it came from (5.x re-saves a
    tokenizer under a class name 4.x does not have)."""
    llm.save_pretrained(folder, max_shard_size=max_shard_size)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in config:
        config["rope_theta"] = rope["rope_theta"]
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    copy_tokenizer_files(tokenizer_source, folder)


def copy_tokenizer_files(source: str, folder: Path) -> None:
    """The tokenizer files of `source` (a folder, or a hub id already in the local cache), byte for byte."""
    src = Path(source).expanduser()
    if not src.is_dir():
        from huggingface_hub import snapshot_download

        try:
            src = Path(snapshot_download(source, local_files_only=True,
                                         allow_patterns=[*TOKENIZER_FILES, *TOKENIZER_PATTERNS]))
        except Exception as e:  # not cached: nothing here to copy it from
            raise UserError(f"{source}: the tokenizer's files are not on this machine ({type(e).__name__}); "
                            "download the model first or give its local folder") from None
    files = [p for p in src.iterdir() if p.name in TOKENIZER_FILES or any(p.match(g) for g in TOKENIZER_PATTERNS)]
    if not any(p.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt") or p.suffix == ".tiktoken" for p in files):
        raise UserError(f"{src}: no tokenizer files (tokenizer.json, tokenizer.model, ...) to copy beside the LLM")
    for path in files:
        shutil.copyfile(path, folder / path.name)


# ---- trained weights (iter_N.pth, DeepSpeed folders) -------------------------------------------------------


def load_trained_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """(trained parameters by LlavaModel name, saved config or None) from a checkpoint file or a DeepSpeed
    folder written by vlmtune or XTuner."""
    path = Path(path)
    if path.is_dir():
        return _load_zero_dir(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    payload = safe_load(path, allowed=_XTUNER_LOGGING_GLOBALS)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        config = config_from_text(payload["config_text"], str(path), payload["config_name"])
        return rename_either(payload["state_dict"], keymaps.XTUNER_STATE_DICT), config
    if isinstance(payload, dict) and "meta" in payload and isinstance(payload.get("state_dict"), dict):
        return rename_either(payload["state_dict"], keymaps.XTUNER_STATE_DICT), None  # XTuner: config not read
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, None  # a bare state dict (e.g. a projector exported by another tool)
    raise UserError(f"{path}: not a vlmtune checkpoint nor an XTuner one (no 'state_dict'); pass iter_N.pth or a ZeRO folder")


def _load_zero_dir(path: Path) -> tuple[dict[str, torch.Tensor], Config | None]:
    """Trained weights from a DeepSpeed folder (saved with exclude_frozen_parameters): vlmtune's iter_N.ds/
    (tag folder `ckpt` or the one `latest` names) or XTuner's iter_N.pth/ (the tag folder itself). ZeRO-1/2:
    the model-states file holds them whole; ZeRO-3: each rank's file holds a shard, and DeepSpeed's own
    zero_to_fp32 merges the ranks' fp32 partitions (read through `deepspeed_safe_load`)."""
    tag_dir = path if any(path.glob("*model_states.pt")) else \
        path / ((path / "latest").read_text().strip() if (path / "latest").is_file() else DS_TAG)
    files = sorted(tag_dir.glob("*model_states.pt"))
    if not files:
        raise UserError(f"{path}: not a DeepSpeed checkpoint folder (no {MODEL_STATES})")
    states = tag_dir / MODEL_STATES if (tag_dir / MODEL_STATES).is_file() else files[0]
    payload = safe_load(states, allowed=_XTUNER_LOGGING_GLOBALS)
    config = config_from_text(payload["config_text"], str(states), payload["config_name"]) if "config_text" in payload else None
    # "param_shapes" names the parameters the optimizer trained, which is what iter_N.pth holds
    trained = {name for group in payload["param_shapes"] for name in group}
    if payload.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0) == 3:
        weights = _zero3_weights(tag_dir)
    else:  # "module" also holds the frozen 4-bit weights' quantization state (absmax, ...) of a QLoRA LLM
        weights = payload["module"]
    missing = sorted(trained - weights.keys())
    if missing:
        raise UserError(f"{path}: {len(missing)} trained parameters are not in the folder (first: {missing[0]!r}); "
                        "is it complete? convert the matching iter_N.pth instead")
    return rename_either({k: v for k, v in weights.items() if k in trained}, keymaps.XTUNER_STATE_DICT), config


def _zero3_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The trained parameters of a ZeRO-3 tag folder in fp32, merged from every rank's shard by DeepSpeed's
    zero_to_fp32 with its torch.load routed to the weights-only loader."""
    from deepspeed.utils import zero_to_fp32

    try:
        # its progress lines go to stderr: not part of a command's output
        with safe_torch_load_in(zero_to_fp32), contextlib.redirect_stdout(sys.stderr):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                                         exclude_frozen_parameters=True)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"{tag_dir}: not a complete ZeRO-3 checkpoint ({type(e).__name__}: {e}); convert the "
                        "matching iter_N.pth instead") from None


def load_into_model(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state_dict` into `model`; error on unknown keys, return trainable params it did not cover."""
    params = dict(model.named_parameters())
    unexpected = [k for k in state_dict if k not in params]
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} weights do not fit this model (first: {unexpected[0]!r}); "
                        "was it trained with a different config (LoRA settings, LLM, projector depth)?")
    wrong = [k for k, v in state_dict.items() if v.shape != params[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(f"{source}: {len(wrong)} weights have other shapes than this model's (first: {k!r} "
                        f"{tuple(state_dict[k].shape)} vs {tuple(params[k].shape)}); it was trained with a different "
                        "config (LoRA rank, LLM, projector): use the config saved with the checkpoint")
    with torch.no_grad():
        for name, value in state_dict.items():
            params[name].copy_(value.to(params[name].dtype))
    return [n for n, p in params.items() if p.requires_grad and n not in state_dict]
