"""`from_pretrained` for models, tokenizers and processors: a missing folder or a key mismatch is one line.

transformers treats a name it cannot open as a hub id, warns about missing and unexpected weights and
initialises the missing ones at random: here a missing local folder is "no such folder" (paths.py) and every
weight of the model must come from the folder, every weight of the folder must be used (but for the ones a
caller names as unused, such as a whole CLIP checkpoint's text tower).
"""
from __future__ import annotations

from vlmtune.errors import UserError
from vlmtune.paths import require_model_folder


def from_pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained` (a tokenizer, processor or config) with a one-line error for a missing folder or
    hub id."""
    require_model_folder(path, f"cannot load {cls.__name__} from")
    try:
        return cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a missing optional kernel (flash-attn)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot load {cls.__name__} from {path!r}: {first}") from None


def load_pretrained_model(cls, path: str, unused_prefixes: tuple[str, ...] = (), **kwargs):
    """A model by `cls.from_pretrained`, with every weight of the model found in the folder and every weight
    of the folder used (but for `unused_prefixes`). transformers only warns about either and initialises the
    missing weights at random, which silently gives a different model."""
    model, info = from_pretrained(cls, path, output_loading_info=True, **kwargs)
    check_loading_info(info, f"{path} ({type(model).__name__})", unused_prefixes)
    return model


def check_loading_info(info: dict, source: str, unused_prefixes: tuple[str, ...] = ()) -> None:
    """A user error naming the first missing / unexpected / wrongly shaped weights of a `from_pretrained`."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(unused_prefixes))
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ())
    if missing or unexpected or mismatched:
        parts = [f"{len(v)} {name} (first: {', '.join(v[:3])})"
                 for name, v in (("missing", missing), ("unexpected", unexpected), ("with other shapes", mismatched)) if v]
        raise UserError(f"{source}: weights do not match the model: {'; '.join(parts)}; the folder holds an incomplete "
                        "or different model: re-download or re-convert it")
