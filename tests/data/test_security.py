"""Nothing runs code it should not: pickled checkpoints, remote model code, decompression bombs, image paths.

Each hostile input is checked to be really hostile (the unsafe path does run its code / decode it), so a
refusal is not a test that cannot fail."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bad_corpus import bomb_png

from vlmtune.cli import main as cli
from vlmtune.data.image import load_image, resolve_image_path
from vlmtune.data.llava_json import RecordError
from vlmtune.errors import UserError

PACKAGE = Path(__file__).resolve().parents[2] / "vlmtune"


class Payload:
    """Unpickling this runs `exec` (what a malicious .pth does): here it only writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def malicious_pth(tmp_path: Path) -> tuple[Path, Path]:
    """(checkpoint path, marker path): a vlmtune-looking checkpoint with a code-running object inside."""
    marker = tmp_path / "marker"
    path = tmp_path / "iter_10.pth"
    torch.save({"format": "vlmtune-ckpt-v1", "state_dict": {"projector.model.0.weight": torch.zeros(2, 2)},
                "extra": Payload(marker)}, path)
    return path, marker


def test_the_payload_really_runs_code_when_loaded_unsafely(tmp_path):
    path, marker = malicious_pth(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "code ran"


def test_a_pickle_with_code_is_refused_by_the_checkpoint_loader(tmp_path):
    from vlmtune.weights import load_trained_weights

    path, marker = malicious_pth(tmp_path)
    with pytest.raises(UserError, match="refused to load") as e:
        load_trained_weights(path)
    assert str(path) in str(e.value) and not marker.exists()


def test_convert_refuses_it_with_one_line_and_exit_2(tmp_path, capsys):
    path, marker = malicious_pth(tmp_path)
    assert cli(["convert", "pth_to_hf", str(path), str(tmp_path / "out")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlmtune: error:")]
    assert len(errors) == 1 and "refused to load" in errors[0] and not marker.exists()


def hostile_projector_folder(tmp_path: Path) -> tuple[Path, Path]:
    """(folder, marker): a converted projector/ folder whose pytorch_model.bin carries the payload."""

    folder, marker = tmp_path / "projector", tmp_path / "marker"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "projector", "visual_hidden_size": 4,
                                                    "llm_hidden_size": 4, "depth": 2}))
    torch.save({"model.0.weight": torch.zeros(4, 4), "extra": Payload(marker)}, folder / "pytorch_model.bin")
    return folder, marker


def test_a_converted_folder_with_a_pickled_payload_does_not_run_it(tmp_path):
    from vlmtune.convert.xtuner import load_projector

    folder, marker = hostile_projector_folder(tmp_path)
    with pytest.raises(Exception):
        load_projector(folder)
    assert not marker.exists()


def test_a_converted_folder_with_a_pickled_payload_is_refused_with_a_clear_message(tmp_path):
    from vlmtune.convert.xtuner import load_projector

    folder, _ = hostile_projector_folder(tmp_path)
    with pytest.raises(UserError, match="refused to load"):
        load_projector(folder)


def test_remote_model_code_runs_only_when_trust_remote_code_is_set(tmp_path):
    """A model folder whose config points at its own Python file (as InternLM2's does)."""
    folder, marker = tmp_path / "custom_llm", tmp_path / "remote_code_ran"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "custom_llm", "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import PretrainedConfig\n"
                                      "class CustomConfig(PretrainedConfig):\n    model_type = 'custom_llm'\n")
    from vlmtune.config import ModelConfig
    from vlmtune.model.build import load_llm

    with pytest.raises(UserError, match="contains custom code"):  # the default config: refused, nothing run
        load_llm(ModelConfig(llm_name_or_path=str(folder), visual_encoder_name_or_path="unused"), torch.float32)
    assert not marker.exists()
    # with the flag the folder's code is imported (in a child process: it lands in a modules cache)
    code = ("import sys, torch\nfrom vlmtune.config import ModelConfig\nfrom vlmtune.model.build import load_llm\n"
            "cfg = ModelConfig(llm_name_or_path=sys.argv[1], visual_encoder_name_or_path='unused', trust_remote_code=True)\n"
            "try:\n    load_llm(cfg, torch.float32)\nexcept Exception:\n    pass  # custom.py defines no model class\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    subprocess.run([sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True, check=True)
    assert marker.read_text() == "ran"


def test_pillow_decompression_bomb_guard_stays_on_and_is_a_per_sample_error(tmp_path):
    """Importing every vlmtune module leaves Pillow's limit at its default; a bomb is image_too_large."""
    import importlib
    import pkgutil

    from PIL import Image

    import vlmtune

    for module in pkgutil.walk_packages(vlmtune.__path__, "vlmtune."):
        if not module.name.endswith("__main__"):
            importlib.import_module(module.name)
    assert Image.MAX_IMAGE_PIXELS == 1024 * 1024 * 1024 // 4 // 3  # Pillow's default (~89.5M pixels)
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(RecordError) as e:
        load_image(tmp_path / "bomb.png")
    assert e.value.kind == "image_too_large" and "bomb.png" in e.value.detail


def test_image_paths_cannot_leave_the_image_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "datasets" / "coco").mkdir(parents=True)
    os.symlink(tmp_path / "datasets" / "coco", folder / "coco")  # the user's own link: allowed
    assert resolve_image_path(folder, "coco/1.jpg") == folder / "coco" / "1.jpg"
    assert resolve_image_path(folder, "sub/../sub/1.jpg") == folder / "sub" / "1.jpg"
    for hostile in ("../secret.jpg", "sub/../../secret.jpg", "/etc/passwd", str(tmp_path / "datasets" / "x.jpg")):
        with pytest.raises(RecordError) as e:
            resolve_image_path(folder, hostile)
        assert e.value.kind == "image_path_escapes"
    allowed = resolve_image_path(folder, str(tmp_path / "datasets" / "x.jpg"), (str(tmp_path / "datasets"),))
    assert allowed == tmp_path / "datasets" / "x.jpg"
