"""Run folders and resuming (#14 classes 1 and 2): a run folder belongs to one process at a
time, nothing a previous run wrote is replaced unless that run is the one resumed, and a
resume must keep the arguments that shaped the saved state (resume_policy.POLICY).

The scripts run through the fork server (tests/scripts_server.py), as test_reliability does.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

import classification
import resume_policy
import runs
import train
import utils
from scripts_server import REPO, hashes, ok, one_line_error
from synthetic import write_voc_txt_tree


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc")
    write_voc_txt_tree(root, 8, size=64, seed=0, csv_name="train.csv")
    (root / "names.txt").write_text("\n".join(utils.VOC_CLASSES) + "\n")
    return root


def yolo(voc: Path, project: Path, name: str, *extra) -> list:
    return ["train.py", "--data", voc / "train.csv", "--names", voc / "names.txt", "--S", 2,
            "--width", 0.0625, "--hidden", 16, "--epochs", 1, "--batch-size", 4, "--workers", 0,
            "--device", "cpu", "--optimizer", "adam", "--lr", 1e-3, "--project", project,
            "--name", name, *extra]


def metric_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- class 1: the lock
def hold_lock(run_dir, ready, done):
    runs.RunLock.acquire(Path(run_dir))
    ready.set()
    done.wait(30)


def test_a_locked_run_folder_refuses_a_second_process_naming_the_holder(tmp_path):
    """Guards against two processes writing one run folder (interleaved metrics.jsonl)."""
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=hold_lock, args=(str(tmp_path), ready, done))
    holder.start()
    try:
        assert ready.wait(30)
        with pytest.raises(utils.UserError, match=f"{tmp_path}: in use by another run "
                                                  rf"\(pid {holder.pid}\)"):
            runs.RunLock.acquire(tmp_path)
    finally:
        done.set()
        holder.join(30)
    # the holder died: the kernel released its lock, and a new process takes it
    lock = runs.RunLock.acquire(tmp_path)
    assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_a_run_name_is_one_file_name(tmp_path, name):
    """Bug: --name "" wrote into project/2, and "../x" outside the project folder."""
    with pytest.raises(utils.UserError, match="a run folder's name is one non-empty file name"):
        runs.make_run_dir(str(tmp_path / "runs"), name)
    assert not (tmp_path / "runs").exists()


def test_new_runs_racing_for_one_name_take_different_folders(tmp_path, monkeypatch):
    """mkdir is the test-and-set: a run that loses the race takes the next name instead
    of failing (or sharing the folder)."""
    real_mkdir = Path.mkdir

    def racing_mkdir(self, *args, **kwargs):  # another run creates exp just before us
        if self.name == "exp" and not self.exists():
            real_mkdir(self, *args, **kwargs)
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    assert runs.make_run_dir(str(tmp_path), "exp") == tmp_path / "exp2"


def test_auto_resume_never_replaces_another_runs_files(scripts, voc, tmp_path):
    """#14's example: --auto-resume into a folder without last.pt replaced the old run's
    best.pt, config.json and metrics.jsonl (exit 0). It is refused, nothing changed."""
    old = tmp_path / "exp"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"lr": 0.5, "batch_size": 64, "data": "other.csv"}))
    (old / "metrics.jsonl").write_text('{"epoch": 1, "mAP": 0.7}\n')
    (old / "best.pt").write_bytes(b"the old run's weights")
    before = hashes(old)
    result = scripts.run(*yolo(voc, tmp_path, "exp", "--auto-resume"))
    line = one_line_error(result, f"{old}: holds a previous run", "no last.pt", "--lr 0.5 -> 0.001",
                          "choose another --name")
    assert hashes(old) == before, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]


def test_auto_resume_restarts_the_same_run_killed_before_its_first_last_pt(scripts, voc, tmp_path):
    """The same command after a crash in epoch 1 (config.json, no last.pt) starts again
    there: that run's own files, not another's."""
    ok(scripts.run(*yolo(voc, tmp_path, "exp", "--auto-resume")))
    run_dir = tmp_path / "exp"
    for name in ("last.pt", "last_prev.pt", "best.pt", "metrics.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    result = ok(scripts.run(*yolo(voc, tmp_path, "exp", "--auto-resume")))
    assert "restarting the same run" in result.stdout
    assert metric_epochs(run_dir) == [1]


def test_two_concurrent_auto_resume_runs_one_refuses_and_the_files_are_one_runs(scripts, voc, tmp_path):
    """Two runs with the same --name --auto-resume wrote into one folder (interleaved
    metrics.jsonl, one config.json lost): the second refuses while the first holds it."""
    run_dir = tmp_path / "exp"
    first = scripts.start(*yolo(voc, tmp_path, "exp", "--auto-resume", "--epochs", 6))
    deadline = time.monotonic() + 60
    while not (run_dir / "config.json").exists():
        assert first.alive() and time.monotonic() < deadline
        time.sleep(0.01)
    second = scripts.run(*yolo(voc, tmp_path, "exp", "--auto-resume", "--epochs", 6))
    one_line_error(second, f"{run_dir}: in use by another run (pid {first.pid})")
    ok(first.wait())
    assert metric_epochs(run_dir) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 6


# --------------------------------------------------------------------------- class 2: resume policy
@pytest.fixture(scope="module")
def stopped(scripts, voc, tmp_path_factory) -> Path:
    """A run stopped (SIGTERM) after its first step, in the middle of epoch 1."""
    project = tmp_path_factory.mktemp("stopped")
    result = scripts.run(*yolo(voc, project, "exp"), env={"REL_STOP_AFTER_STEPS": 1}, faults=True)
    assert result.rc == 0 and "interrupted" in result.stderr, str(result)
    assert utils.load_checkpoint(project / "exp" / "last.pt")["batch"] == 1
    return project / "exp"


@pytest.mark.parametrize("change, fragment", [
    (["--batch-size", "2"], "--batch-size 4 -> 2"),  # skipped 28 of 64 images of that epoch
    (["--optimizer", "sgd"], "--optimizer 'adam' -> 'sgd'"),  # was a traceback
    (["--lr", "0.01", "--seed", "3"], "--lr 0.001 -> 0.01; --seed 0 -> 3"),  # lr was silently ignored
])
def test_resume_with_other_arguments_is_refused_in_one_line(scripts, voc, stopped, change, fragment):
    before = hashes(stopped)
    result = scripts.run(*yolo(voc, stopped.parent, "exp", "--resume", stopped, *change))
    one_line_error(result, f"{stopped / 'last.pt'}: cannot resume with other arguments", fragment)
    assert hashes(stopped) == before


def test_resume_with_a_reordered_names_file_is_refused(scripts, voc, stopped):
    """The run's own --names path, its lines reordered: every class would change meaning,
    yet the arguments are the same (it was accepted)."""
    before, names = hashes(stopped), (voc / "names.txt").read_text()
    (voc / "names.txt").write_text("\n".join(reversed(utils.VOC_CLASSES)) + "\n")
    try:
        result = scripts.run(*yolo(voc, stopped.parent, "exp", "--resume", stopped))
    finally:
        (voc / "names.txt").write_text(names)
    one_line_error(result, "the run was trained with class_names ['aeroplane'", "['tvmonitor'")
    assert hashes(stopped) == before


def test_resume_may_extend_epochs_and_change_workers(scripts, voc, tmp_path):
    ok(scripts.run(*yolo(voc, tmp_path, "exp")))
    result = ok(scripts.run(*yolo(voc, tmp_path, "exp", "--resume", tmp_path / "exp", "--epochs", 2,
                                  "--workers", 1, "--name", "other")))
    assert "note: resuming with --epochs 2 (was 1)" in result.stdout
    assert "note: resuming with --workers 1 (was 0)" in result.stdout
    assert "warning: --name 'other' ignored on resume" in result.stdout
    assert metric_epochs(tmp_path / "exp") == [1, 2]
    assert not (tmp_path / "other").exists()


def test_resume_alone_continues_the_run_with_its_own_arguments(scripts, voc, tmp_path):
    """Bug: ``train.py --resume RUN`` alone (the README's command) compared the script's
    defaults with the run's arguments and refused every run not started with them; now
    arguments not given are the run's own (its latest config), those given are compared."""
    run_dir = tmp_path / "exp"
    result = scripts.run(*yolo(voc, tmp_path, "exp"), env={"REL_STOP_AFTER_STEPS": 1}, faults=True)
    assert result.rc == 0 and "interrupted" in result.stderr, str(result)
    before = hashes(run_dir)
    refused = scripts.run("train.py", "--resume", run_dir, "--batch-size", 2)  # given: compared
    one_line_error(refused, "cannot resume with other arguments", "--batch-size 4 -> 2")
    assert hashes(run_dir) == before
    result = ok(scripts.run("train.py", "--resume", run_dir))
    assert "cannot resume" not in result.stderr and "note: resuming" not in result.stdout
    assert metric_epochs(run_dir) == [1]
    ok(scripts.run("train.py", "--resume", run_dir, "--epochs", 2))  # a change, recorded
    assert metric_epochs(run_dir) == [1, 2]
    result = ok(scripts.run("train.py", "--resume", run_dir))  # the latest config: 2 epochs, done
    assert "note: resuming" not in result.stdout and metric_epochs(run_dir) == [1, 2]


def test_resume_defaults_come_from_the_runs_config_and_leave_the_folder_alone(tmp_path):
    """The Darknet scripts' parser too; --project and --name stay where the folder is now."""
    run_dir = tmp_path / "moved"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps({"epochs": 7, "lr": 0.5, "width": 0.25, "project": "elsewhere",
                                                     "name": "old", "world_size": 2}))
    args = classification.parse_args(["--resume", str(run_dir), "--lr", "0.1"])
    assert (args.epochs, args.lr, args.width) == (7, 0.1, 0.25)  # given wins, the rest the run's
    assert (args.project, args.name) == ("runs/darknet", classification.build_parser().parse_args([]).name)
    (run_dir / "config_resumed.json").write_text(json.dumps({"epochs": 9}))  # the latest resume's
    assert classification.parse_args(["--resume", str(run_dir / "last.pt")]).epochs == 9
    assert train.parse_args(["--resume", str(tmp_path)]).epochs == 135  # no config: the defaults


# --------------------------------------------------------------------------- the table
def test_every_training_option_has_a_resume_decision():
    """A new option must be decided in resume_policy.POLICY (and so in the docs)."""
    for parser in (train.build_parser(), classification.build_parser()):
        dests = {a.dest for a in parser._actions if a.dest != "help"}
        assert dests - set(resume_policy.POLICY) == set(), parser.prog


def test_the_docs_show_the_table_in_code():
    assert resume_policy.table_markdown() in (REPO / "docs" / "training.md").read_text()


def test_policy_compares_by_value_and_reports_each_kind():
    saved = {"lr": 0.001, "milestones": [75, 105], "workers": 0, "backbone": "a.pt", "resume": None,
             "batch_size": 8}
    now = {"lr": 1e-3, "milestones": (75.0, 105.0), "workers": 4, "backbone": "b.pt", "resume": "x",
           "batch_size": 8, "new_option": 1}
    differ, notes = resume_policy.differences(saved, now)
    assert differ == [] and len(notes) == 2
    assert notes[0].startswith("warning: --backbone 'b.pt' ignored on resume")  # sorted by name
    assert notes[1].startswith("note: resuming with --workers 4 (was 0)")
    with pytest.raises(utils.UserError, match=r"--batch-size 8 -> 16$|--batch-size 8 -> 16\)"):
        resume_policy.compare(saved, now | {"batch_size": 16}, "x.pt")
