"""Folder checkpoints (FSDP2's distributed checkpoints) replace the old folder whole or not at all.

Real folders and files; the interruptions are the named fault points of `mllm_cl.faults`
(``write.<name>``: the new folder is complete, not yet swapped in; ``swap.<name>``: between the
two renames of the swap). The FSDP2 save itself runs in the slow two-process tests
(tests/test_multiprocess.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mllm_cl import faults
from mllm_cl.results import folder_names, recover_folders, swap_in_folder
from mllm_cl.rundir import _last_in


def write_folder(path: Path, step: int) -> None:
    path.mkdir(parents=True)
    (path / "meta.pt").write_text(f"step {step}")
    (path / "__0_0.distcp").write_text(f"shard 0 of step {step}")


def step_of(path: Path) -> str:
    return (path / "meta.pt").read_text()


@pytest.fixture
def armed(monkeypatch):
    def arm(point: str):
        faults._seen.clear()
        monkeypatch.setenv("MLLM_CL_ENOSPC_AT", point)

    yield arm
    faults._seen.clear()


def test_a_finished_folder_replaces_the_old_one_and_leaves_nothing_behind(tmp_path):
    last = tmp_path / "last.ckpt"
    write_folder(last, 1)
    partial, aside = (Path(p) for p in folder_names(str(last)))
    write_folder(partial, 2)
    swap_in_folder(str(last))
    assert step_of(last) == "step 2" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    single = tmp_path / "file.ckpt"  # over a single-file checkpoint of an older run, too
    single.write_text("a file")
    write_folder(Path(folder_names(str(single))[0]), 3)
    swap_in_folder(str(single))
    assert step_of(single) == "step 3" and sorted(os.listdir(tmp_path)) == ["file.ckpt", "last.ckpt"]
    assert not aside.exists()


def test_cut_between_the_renames_the_new_folder_is_put_in_place(tmp_path, armed):
    last = tmp_path / "last.ckpt"
    write_folder(last, 1)
    partial, aside = (Path(p) for p in folder_names(str(last)))
    write_folder(partial, 2)
    armed("swap.last.ckpt")
    with pytest.raises(OSError):
        swap_in_folder(str(last))
    assert not last.exists() and aside.exists() and partial.exists()  # the state a kill there leaves
    assert _last_in(str(tmp_path)) == str(last)  # resolving --ckpt_path last recovers first
    assert step_of(last) == "step 2" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_a_write_that_never_reached_the_swap_keeps_the_old_folder(tmp_path):
    last = tmp_path / "last.ckpt"
    write_folder(last, 1)
    partial = Path(folder_names(str(last))[0])
    partial.mkdir()
    (partial / "__1_0.distcp").write_text("half of step 2")  # rank 1's shard, rank 0 killed
    recover_folders(str(tmp_path))
    assert step_of(last) == "step 1" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_only_the_aside_folder_left_is_put_back(tmp_path):
    """Killed after the first rename of a swap whose new folder is gone (deleted by hand): the old
    checkpoint comes back rather than leaving none."""
    last = tmp_path / "last.ckpt"
    write_folder(Path(folder_names(str(last))[1]), 1)
    recover_folders(str(tmp_path))
    assert step_of(last) == "step 1" and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
