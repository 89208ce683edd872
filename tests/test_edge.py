"""The batch edges: tasks in this process, folders renamed into place, folder locks."""

from __future__ import annotations

import os

import pytest

from octpipe.edge import folder_lock, run_tasks, staged_dir
from octpipe.errors import OctpipeError


def _fail_on_two(x: int) -> int:
    if x == 2:
        raise KeyError(x)
    return x * 10


def test_tasks_in_this_process_run_in_order_and_raise_with_their_traceback():
    assert list(run_tasks(_fail_on_two, [3, 1], workers=0)) == [(3, 30), (1, 10)]
    with pytest.raises(KeyError):  # catch applies to Dask tasks only
        list(run_tasks(_fail_on_two, [1, 2, 3], workers=0, catch=True))


def test_a_staged_folder_replaces_the_target_only_when_complete(tmp_path):
    target, under = tmp_path / "done", tmp_path / ".staging"
    with staged_dir(target, under=under) as tmp:
        (tmp / "a.txt").write_text("first")
        assert not target.exists()
    with pytest.raises(RuntimeError), staged_dir(target, under=under) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (target / "a.txt").read_text() == "first" and not list(under.iterdir())
    with staged_dir(target, under=under, prefix="p-") as tmp:
        (tmp / "a.txt").write_text("second")
    assert (target / "a.txt").read_text() == "second" and not list(under.iterdir())


def test_a_target_written_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    import octpipe.edge as edge

    target = tmp_path / "done"
    real_rename = edge.os.rename

    def rename_after_theirs(src, dst):  # the other writer's rename lands just before ours
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
        real_rename(src, dst)

    monkeypatch.setattr(edge.os, "rename", rename_after_theirs)
    with pytest.raises(FileExistsError), staged_dir(target, under=tmp_path / ".staging") as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert not list((tmp_path / ".staging").iterdir())


def test_a_held_folder_lock_refuses_a_second_writer_and_names_it(tmp_path):
    (tmp_path / ".staging-old").mkdir()
    with folder_lock(tmp_path, command="export", busy="busy: {holder}", stale=".staging-*"):
        assert not (tmp_path / ".staging-old").exists()
        with pytest.raises(OctpipeError, match=rf"busy: export process \(pid {os.getpid()}\)"):
            with folder_lock(tmp_path, command="export", busy="busy: {holder}"):
                pass
    with folder_lock(tmp_path, command="again", busy="busy: {holder}"):  # released on exit
        pass
