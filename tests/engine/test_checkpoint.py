"""Checkpoint files: which count, rotation, resume lookup, safe loading, and loading into a model.

Real iter_N.pth / iter_N.ds pairs written by training are compared in tests/test_train.py; here the files
are made by hand in the same layout, so every edge (leftovers of a crashed save, a pickle that would run code)
is exact.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmtune.config import load_config
from vlmtune.engine.checkpoint import checkpoint_steps, find_resume, rotate
from vlmtune.weights import DS_TAG, FORMAT, load_into_model, load_trained_weights, safe_load
from vlmtune.errors import UserError


def fake_checkpoint(work_dir, step: int) -> None:
    """The layout save_checkpoint leaves: iter_N.ds/ckpt/ (DeepSpeed) and iter_N.pth."""
    (work_dir / f"iter_{step}.ds" / DS_TAG).mkdir(parents=True)
    torch.save({"format": FORMAT, "step": step}, work_dir / f"iter_{step}.pth")


@pytest.fixture
def work_dir(tmp_path):
    for step in (1, 2, 5, 10):
        fake_checkpoint(tmp_path, step)
    # what crashes leave behind: a save interrupted before the rename, a half-written .pth, a .ds whose .pth
    # was never written, and an unrelated file
    (tmp_path / ".iter_12.ds.tmp" / DS_TAG).mkdir(parents=True)
    (tmp_path / "iter_11.pth.tmp").write_bytes(b"PK\x03\x04 half")
    (tmp_path / "iter_13.ds" / DS_TAG).mkdir(parents=True)
    (tmp_path / "iter_best.pth").write_bytes(b"")
    return tmp_path


def test_only_complete_checkpoints_count(work_dir):
    assert checkpoint_steps(work_dir) == [1, 2, 5, 10]
    assert checkpoint_steps(work_dir / "missing") == []


def test_resume_auto_takes_the_newest_complete_checkpoint(work_dir, tmp_path_factory):
    assert find_resume(work_dir, "auto") == work_dir / "iter_10.pth"
    assert find_resume(tmp_path_factory.mktemp("empty"), "auto") is None
    assert find_resume(work_dir, str(work_dir / "iter_2.pth")) == work_dir / "iter_2.pth"
    with pytest.raises(UserError, match="iter_11.pth: no such checkpoint file"):
        find_resume(work_dir, str(work_dir / "iter_11.pth"))


def test_rotation_keeps_the_newest_pairs(work_dir):
    rotate(work_dir, keep=2)
    names = sorted(p.name for p in work_dir.iterdir())
    assert names == [".iter_12.ds.tmp", "iter_10.ds", "iter_10.pth", "iter_11.pth.tmp", "iter_13.ds", "iter_5.ds",
                     "iter_5.pth", "iter_best.pth"]
    rotate(work_dir, keep=0)  # 0 keeps everything
    assert sorted(p.name for p in work_dir.iterdir()) == names
    rotate(work_dir, keep=1)
    assert checkpoint_steps(work_dir) == [10] and not (work_dir / "iter_5.ds").exists()


class Payload:
    """Unpickling this runs open(path, 'w'): a stand-in for a checkpoint from the internet that runs code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    evil = tmp_path / "iter_1.pth"
    torch.save({"format": FORMAT, "state_dict": {"projector.model.0.weight": torch.zeros(2)}, "x": Payload(marker)}, evil)
    with pytest.raises(UserError, match="iter_1.pth: refused to load: the file contains pickled code"):
        load_trained_weights(evil)
    with pytest.raises(UserError, match="refused to load"):
        safe_load(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: an unsafe load does run it
    assert marker.exists()


def test_unreadable_and_foreign_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nowhere.pth: checkpoint not found"):
        load_trained_weights(tmp_path / "nowhere.pth")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="cut.pth: not a readable checkpoint"):
        load_trained_weights(tmp_path / "cut.pth")
    torch.save({"meta": "no tensors here"}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth: not a vlmtune checkpoint"):
        load_trained_weights(tmp_path / "other.pth")
    (tmp_path / "empty.ds").mkdir()
    with pytest.raises(UserError, match="empty.ds: not a DeepSpeed checkpoint folder"):
        load_trained_weights(tmp_path / "empty.ds")


def test_a_bare_state_dict_loads_without_a_config(tmp_path):
    weights = {"projector.model.0.weight": torch.randn(4, 3), "projector.model.0.bias": torch.randn(4)}
    torch.save(weights, tmp_path / "projector.pth")
    loaded, config = load_trained_weights(tmp_path / "projector.pth")
    assert config is None and loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_a_vlmtune_checkpoint_brings_its_config(tiny, tmp_path):
    cfg = load_config("tiny_llava_pretrain", {"lr": 0.05})
    weights = {"projector.model.2.bias": torch.randn(8)}
    torch.save({"format": FORMAT, "state_dict": weights, "config_text": cfg.text, "config_name": cfg.name,
                "step": 3, "trainer_state": {"step": 3}}, tmp_path / "iter_3.pth")
    loaded, config = load_trained_weights(tmp_path / "iter_3.pth")
    assert torch.equal(loaded["projector.model.2.bias"], weights["projector.model.2.bias"])
    assert config.name == "tiny_llava_pretrain" and config.train.lr == 0.05 and config.text == cfg.text


def test_an_incomplete_zero3_folder_is_one_line(tmp_path):
    """A ZeRO-3 folder whose ranks' optimizer shards (where the fp32 weights are) are missing: one line naming
    the folder and the .pth to convert instead (a complete one is read in tests/engine/test_zero_stages.py)."""
    (tmp_path / "iter_4.ds" / DS_TAG).mkdir(parents=True)
    torch.save({"module": {}, "param_shapes": [{"projector.model.0.weight": torch.Size([4, 3])}], "buffer_names": [],
                "ds_config": {"zero_optimization": {"stage": 3}}, "ds_version": "0.19.8"},
               tmp_path / "iter_4.ds" / DS_TAG / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match=r"iter_4.ds/ckpt: not a complete ZeRO-3 checkpoint .*convert the matching iter_N.pth"):
        load_trained_weights(tmp_path / "iter_4.ds")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.ModuleDict({"projector": nn.Linear(3, 4), "llm": nn.Linear(4, 4), "lora": nn.Linear(4, 2)})
    model["llm"].requires_grad_(False)
    return model


def test_load_into_model_copies_and_reports_what_starts_fresh():
    model = tiny_model()
    weights = {"projector.weight": torch.randn(4, 3), "projector.bias": torch.randn(4)}
    fresh = load_into_model(model, weights, "pretrain.pth")
    assert torch.equal(model["projector"].weight, weights["projector.weight"])
    assert torch.equal(model["projector"].bias, weights["projector.bias"])
    assert fresh == ["lora.weight", "lora.bias"]  # trainable, not in the file; frozen llm.* is not listed


def test_load_into_model_refuses_weights_of_another_model():
    model = tiny_model()
    before = model["projector"].weight.detach().clone()
    with pytest.raises(UserError, match=r"pretrain.pth: 1 weights do not fit this model \(first: 'projector.model.0.weight'\)"):
        load_into_model(model, {"projector.weight": torch.randn(4, 3), "projector.model.0.weight": torch.randn(4, 3)},
                        "pretrain.pth")
    assert torch.equal(model["projector"].weight, before)  # nothing copied from a file that does not fit


# ---- the global batch a resume keeps on another number of ranks (engine/checkpoint.resume_accumulation) ----------

def saved_by(tmp_path, ranks: int, global_batch: int | None):
    """A checkpoint as `ranks` ranks leave it: one optimizer shard per rank; trainer_state with `global_batch`
    (None: a checkpoint written before vlmtune recorded it)."""
    pth = tmp_path / "iter_6.pth"
    (tmp_path / "iter_6.ds" / DS_TAG).mkdir(parents=True)
    for rank in range(ranks):
        (tmp_path / "iter_6.ds" / DS_TAG / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    state = {"step": 6} if global_batch is None else {"step": 6, "global_batch": global_batch}
    torch.save({"format": FORMAT, "trainer_state": state}, pth)
    return pth


def tiny_cfg(tiny, **options):
    return load_config("tiny_llava_task_finetune_lora", options)


@pytest.mark.parametrize("ranks_now,batch,expected", [(1, 4, 4), (2, 4, 2), (4, 4, 1), (4, 2, 2), (8, 2, 1), (2, 1, 8)])
def test_the_accumulation_keeps_the_saved_global_batch(tiny, tmp_path, ranks_now, batch, expected):
    """16 samples per step saved on 2 ranks: world x batch x accumulation stays 16 on any split of it."""
    from vlmtune.engine.checkpoint import resume_accumulation

    pth = saved_by(tmp_path, 2, 16)
    cfg = tiny_cfg(tiny, batch_size=batch, accumulative_counts=2)
    assert resume_accumulation(pth, cfg, ranks_now) == (expected, 2)
    assert ranks_now * batch * expected == 16


def test_a_global_batch_the_new_ranks_cannot_make_names_what_would(tiny, tmp_path):
    from vlmtune.engine.checkpoint import resume_accumulation

    pth = saved_by(tmp_path, 2, 8)
    with pytest.raises(UserError) as e:
        resume_accumulation(pth, tiny_cfg(tiny, batch_size=4), 3)
    line = str(e.value)
    assert "\n" not in line and str(pth) in line and "global batch is 8 samples" in line and "saved on 2 rank(s)" in line
    assert "resume on 1 or 2 rank(s)" in line and "batch_size" not in line  # 8 = 3 x b x a has no solution
    with pytest.raises(UserError, match=r"cannot make: resume on 1 or 2 rank\(s\), or with --cfg-options batch_size=1 or 2$"):
        resume_accumulation(pth, tiny_cfg(tiny, batch_size=4), 4)  # 8 on 4 ranks: batch 1 or 2
    with pytest.raises(UserError, match=r"cannot make: resume with --cfg-options batch_size=1 or 2$"):
        resume_accumulation(pth, tiny_cfg(tiny, batch_size=3), 4)  # no number of ranks x 3 makes 8
    with pytest.raises(UserError, match=r"global batch is 8 packs .*: resume on 1 or 2 or 4 or 8 rank\(s\)$"):
        resume_accumulation(pth, tiny_cfg(tiny, pack_to_max_length=True), 3)


def test_a_checkpoint_without_the_record_had_the_configs_global_batch(tiny, tmp_path):
    """Checkpoints from before the global_batch record: G = the ranks that saved it x batch x accumulation."""
    from vlmtune.engine.checkpoint import resume_accumulation

    pth = saved_by(tmp_path, 4, None)
    assert resume_accumulation(pth, tiny_cfg(tiny, batch_size=2, accumulative_counts=3), 2) == (6, 4)


def test_a_folder_without_optimizer_shards_is_one_line(tiny, tmp_path):
    from vlmtune.engine.checkpoint import resume_accumulation

    pth = saved_by(tmp_path, 0, 8)
    with pytest.raises(UserError, match="holds no ZeRO optimizer shard"):
        resume_accumulation(pth, tiny_cfg(tiny), 1)
    (tmp_path / "iter_6.ds" / DS_TAG / "mp_rank_00_model_states.pt").write_bytes(b"")  # no ZeRO: state kept whole
    assert resume_accumulation(pth, tiny_cfg(tiny, batch_size=2), 2) == (2, None)
