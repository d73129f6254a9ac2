"""Tests for forkflow.run_dir: which output directories a command may use, and that refusing deletes nothing."""

import json

import pytest

from forkflow.run_dir import MARKER, RunDirError, prepare_run_dir


def _marker(path):
    return json.loads((path / MARKER).read_text())


def test_a_new_path_is_created_with_a_marker(tmp_path):
    out = tmp_path / "runs" / "demo"
    assert prepare_run_dir(out, "demo") == out
    assert out.is_dir() and _marker(out) == {"kind": "demo"}
    assert [p.name for p in out.iterdir()] == [MARKER]


def test_an_empty_directory_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    prepare_run_dir(str(out), "demo")
    assert _marker(out) == {"kind": "demo"}


def test_a_previous_run_of_the_same_kind_is_replaced_or_kept(tmp_path):
    out = prepare_run_dir(tmp_path / "run", "demo")
    (out / "sft").mkdir()
    (out / "sft" / "weights.bin").write_bytes(b"old")
    prepare_run_dir(out, "demo")
    assert (out / "sft" / "weights.bin").read_bytes() == b"old"  # kept: a command may resume
    prepare_run_dir(out, "demo", replace=True)
    assert sorted(p.name for p in out.iterdir()) == [MARKER] and _marker(out) == {"kind": "demo"}


def test_replacing_a_run_never_follows_its_symlinks(tmp_path):
    outside = tmp_path / "user_models"
    outside.mkdir()
    (outside / "model.bin").write_bytes(b"keep me")
    out = prepare_run_dir(tmp_path / "run", "demo")
    (out / "base").symlink_to(outside, target_is_directory=True)
    linked = tmp_path / "linked_run"  # the run directory itself reached through a symlink
    linked.symlink_to(out, target_is_directory=True)
    prepare_run_dir(linked, "demo", replace=True)
    assert (outside / "model.bin").read_bytes() == b"keep me"
    assert linked.is_symlink() and sorted(p.name for p in out.iterdir()) == [MARKER]


@pytest.mark.parametrize("replace", [False, True])
def test_a_directory_of_other_files_is_refused_and_left_alone(tmp_path, replace):
    out = tmp_path / "mine"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "chapter1.tex").write_text("precious")
    (out / ".hidden").write_text("also precious")
    with pytest.raises(RunDirError, match="no .forkflow-run marker") as refused:
        prepare_run_dir(out, "demo", replace=replace)
    message = str(refused.value)
    assert str(out) in message and "--out" in message and "\n" not in message
    assert isinstance(refused.value, ValueError)
    assert (out / "thesis" / "chapter1.tex").read_text() == "precious"
    assert (out / ".hidden").read_text() == "also precious"
    assert not (out / MARKER).exists()


def test_a_file_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    with pytest.raises(RunDirError, match="not a directory") as refused:
        prepare_run_dir(path, "demo", replace=True)
    assert str(path) in str(refused.value)
    assert path.read_text() == "precious"


@pytest.mark.parametrize("marker", ['{"kind": "rl"}\n', "not json", '["demo"]'])
def test_a_run_of_another_kind_or_a_bad_marker_is_refused(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).write_text(marker)
    (out / "checkpoint.bin").write_bytes(b"ckpt")
    with pytest.raises(RunDirError, match="not a 'demo' run"):
        prepare_run_dir(out, "demo", replace=True)
    assert (out / "checkpoint.bin").read_bytes() == b"ckpt" and (out / MARKER).read_text() == marker


def test_the_error_names_the_option_that_picks_the_directory(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(RunDirError, match="choose another out="):
        prepare_run_dir(tmp_path, "rl", option="out=")
