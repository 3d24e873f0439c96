"""Known, harmless third-party start-up notices, kept off vlmtune's output unless asked for.

Each rule names one exact message (and where it comes from), never a whole logger or warning category: a new
or different message from the same library still shows. `vlmtune --verbose` or VLMTUNE_VERBOSE=1 (inherited
by torchrun's ranks) shows everything. Progress bars of model loading and saving (transformers,
huggingface_hub) are switched off too; vlmtune's own training bar stays.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings

VERBOSE_ENV = "VLMTUNE_VERBOSE"

# (logger name, exact message) of log records to drop.
LOG_MESSAGES = [
    # transformers 5 without torchvision (its PyPI wheel does not import beside the CPU torch): the PIL
    # processor is what vlmtune wants anyway (image_preprocess='hf' is bit-exact with it)
    *(("transformers.utils.import_utils",
       f"`{name}` requires torchvision (not installed); falling back to `{name}Pil` for backward compatibility. "
       f"Install torchvision to use the default backend, or import `{name}Pil` directly to silence this warning.")
      for name in ("CLIPImageProcessor", "LlavaImageProcessor", "SiglipImageProcessor", "LlavaNextImageProcessor")),
    # bitsandbytes' optional CPU kernel lives in the `kernels` package, which fetches code from the hub: not installed
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module named "
     "'kernels'. Please make sure you already `pip install kernels` and the kernels >= 0.11.1"),
    # DeepSpeed on a machine without a GPU: the CPU accelerator is what vlmtune uses there
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
]
# (category, exact message) of warnings to drop: deprecated names used inside the libraries, not by vlmtune.
WARNING_MESSAGES = [
    (FutureWarning, "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use "
     "`is_activation_checkpointing` instead."),
    (FutureWarning, "`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
     "`activation_checkpointing_enable` instead."),
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
     "`torch.distributed.all_gather_single` instead."),
]
# Lines DeepSpeed print()s to stdout while it starts (see `printed_lines_dropped`).
PRINTED_LINES = [
    "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
]


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _DropExact(logging.Filter):
    """Drops the records of one logger whose message is one of `messages`, exactly."""

    def __init__(self, messages: set[str]):
        super().__init__()
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() not in self.messages


def install(show_all: bool) -> None:
    """Silence the known notices in this process (call before the libraries are imported); `show_all` sets
    VLMTUNE_VERBOSE for child processes and silences nothing."""
    if show_all:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    by_logger: dict[str, set[str]] = {}
    for name, message in LOG_MESSAGES:
        by_logger.setdefault(name, set()).add(message)
    for name, messages in by_logger.items():
        logging.getLogger(name).addFilter(_DropExact(messages))
    for category, message in WARNING_MESSAGES:
        warnings.filterwarnings("ignore", message=re.escape(message) + r"\Z", category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # huggingface_hub's and transformers' bars


@contextlib.contextmanager
def printed_lines_dropped():
    """Run a block whose library code print()s known lines (PRINTED_LINES) to stdout: those are dropped, every
    other line is printed as it was."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line not in PRINTED_LINES:
                print(line, file=sys.stdout)
