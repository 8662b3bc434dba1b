"""Output safety: a user's files survive every misuse of --out / destination, interrupted runs leave
the previous output intact, and what killed runs leave behind is cleaned up on the next run."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from zmagic_jax import cli
from zmagic_jax._io import MARKER, OutputError, atomic_output_dir, check_output_dir, check_output_file, read_marker

# checks that stop before any work: nothing is traced, nothing compiles
QUICK = ["--no-digits", "--no-canvas", "--no-one-way", "--dims", "2", "--samples", "16", "--steps", "2"]


def previous_output(folder, pid=None, content="earlier run"):
    """A folder as zmagic leaves it: its files and the marker."""
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(content)
    marker = {"tool": "zmagic_jax", "version": "0", "command": "demo", "pid": pid or os.getpid(),
              "host": os.uname().nodename}
    (folder / MARKER).write_text(json.dumps(marker))
    return folder


def no_work(monkeypatch):
    """Fail loudly if the demo gets past its output checks."""
    from zmagic_jax.tasks import _testbed_demo

    def work(*args, **kwargs):
        raise AssertionError("the demo started work before checking --out")
    monkeypatch.setattr(_testbed_demo, "prepare_testbed_demo", work)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_folder_zmagic_did_not_write_is_never_replaced(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "thesis.txt").write_text("x")
    err = run_cli(["demo", *QUICK, "--out", str(user)], capsys)
    assert str(user) in err and "did not write" in err
    err = run_cli(["demo", *QUICK, "--out", str(user), "--overwrite"], capsys)  # not even with --overwrite
    assert "did not write" in err
    assert [p.name for p in tmp_path.iterdir()] == ["userdir"] and (user / "thesis.txt").read_text() == "x"


def test_a_file_given_as_out_is_refused_and_untouched(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    for extra in ([], ["--overwrite"]):
        err = run_cli(["demo", *QUICK, "--out", str(target), *extra], capsys)
        assert str(target) in err and "is a file" in err
    assert target.read_text() == "keep me" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_the_current_folder_and_symlinks_are_refused(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), ".."):
        assert "current folder" in run_cli(["demo", *QUICK, "--out", out], capsys)
    previous_output(tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "symbolic link" in run_cli(["demo", *QUICK, "--out", "link", "--overwrite"], capsys)
    assert (tmp_path / "real" / "report.json").read_text() == "earlier run"


def test_a_previous_output_needs_overwrite(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    out = previous_output(tmp_path / "demo")
    err = run_cli(["demo", *QUICK, "--out", str(out)], capsys)
    assert "--overwrite" in err and str(out) in err
    assert check_output_dir(out, overwrite=True) == out  # accepted with the flag
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty) == empty  # an empty folder loses nothing


def test_an_unwritable_destination_fails_before_any_work(tmp_path, monkeypatch, capsys):
    no_work(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    err = run_cli(["demo", *QUICK, "--out", str(blocker / "out")], capsys)
    assert "cannot write" in err and "--out" in err
    if os.path.isdir("/sys/kernel"):  # read-only for everyone, root included
        assert "cannot write" in run_cli(["demo", *QUICK, "--out", "/sys/kernel/zmagic-test/out"], capsys)


def test_swap_replaces_only_a_previous_output_and_marks_the_new_one(tmp_path):
    out = previous_output(tmp_path / "out")
    with atomic_output_dir(out, overwrite=True, command="test") as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new.txt"]
    assert read_marker(out)["command"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # the destination changed while the run worked: the finished result is kept, the user's file too
    with pytest.raises(OutputError, match="kept in"):
        with atomic_output_dir(tmp_path / "late", command="test") as staging:
            (staging / "result.txt").write_text("done")
            (tmp_path / "late").mkdir()
            (tmp_path / "late" / "user.txt").write_text("mine")
    assert (tmp_path / "late" / "user.txt").read_text() == "mine"
    assert (staging / "result.txt").read_text() == "done"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_what_killed_runs_left_is_cleaned_up_or_restored(tmp_path):
    out = previous_output(tmp_path / "out")
    pid = dead_pid()
    stale = previous_output(tmp_path / f".out.{pid}.abc123.tmp", pid=pid, content="half")
    alive = previous_output(tmp_path / f".out.{os.getppid()}.def456.tmp", pid=os.getppid(), content="running")
    foreign = tmp_path / ".out.1.xyz.tmp"  # no marker: not ours, never touched
    foreign.mkdir()
    with pytest.warns(RuntimeWarning, match="interrupted run"):
        check_output_dir(out, overwrite=True)
    assert not stale.exists() and alive.exists() and foreign.exists() and out.exists()
    # killed between the two renames: the output is missing, its old copy is put back
    os.replace(out, tmp_path / f".out.old-{pid}")
    with pytest.warns(RuntimeWarning, match="restored"):
        check_output_dir(out, overwrite=True)
    assert (out / "report.json").read_text() == "earlier run"


def test_a_run_killed_while_making_its_staging_folder_leaves_nothing_behind(tmp_path):
    """Killed between making the folder and renaming it to .tmp: it holds the marker at most."""
    out = previous_output(tmp_path / "out")
    pid = dead_pid()
    empty = tmp_path / f".out.{pid}.aaa.new"
    empty.mkdir()
    part = tmp_path / f".out.{pid}.bbb.new"
    part.mkdir()
    (part / f".{MARKER}.x1y2.tmp").write_text('{"tool": "zm')  # killed while writing the marker
    marked = previous_output(tmp_path / f".out.{pid}.ccc.new", pid=pid, content="x")
    (marked / "report.json").unlink()  # marker only
    user = tmp_path / f".out.{pid}.ddd.new"  # someone's data under that name: never touched
    user.mkdir()
    (user / "mine.txt").write_text("mine")
    alive = tmp_path / f".out.{os.getppid()}.eee.new"  # a live run about to rename it
    alive.mkdir()
    with pytest.warns(RuntimeWarning, match="interrupted run"):
        check_output_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", user.name, alive.name])
    # a staging folder appears under its .tmp name with its marker already inside
    with atomic_output_dir(tmp_path / "fresh", command="test") as staging:
        assert staging.name.endswith(".tmp") and read_marker(staging)["command"] == "test"
        assert sorted(p.name for p in staging.iterdir()) == [MARKER]


def test_convert_never_replaces_a_user_file_or_folder(tmp_path, capsys):
    from zmagic_jax.checkpoint_io import save_params
    from zmagic_jax.ports import is_converted_file

    source = tmp_path / "missing.pt"  # never read: the destination is checked first
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    user = tmp_path / "user.safetensors"
    save_params(user, {"w": [1.0]})  # a safetensors file, but not one zmagic converted
    ours = tmp_path / "onet.safetensors"
    save_params(ours, {"w": [1.0]}, metadata={"network": "onet"})
    assert is_converted_file(ours) and not is_converted_file(user)
    assert "is a folder" in run_cli(["convert", "onet", str(source), str(folder)], capsys)
    assert "not written by zmagic" in run_cli(["convert", "onet", str(source), str(user), "--overwrite"], capsys)
    assert "--overwrite" in run_cli(["convert", "onet", str(source), str(ours)], capsys)
    assert check_output_file(ours, overwrite=True, ours=is_converted_file) == ours
    assert "source" in run_cli(["convert", "onet", str(source), str(ours), "--overwrite"], capsys)
    assert folder.is_dir() and is_converted_file(ours)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, monkeypatch):
    out = previous_output(tmp_path / "demo")

    def killed_midway(args):
        with atomic_output_dir(args.out, overwrite=True) as staging:
            (staging / "half.txt").write_text("half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    monkeypatch.setattr(cli, "_demo", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", "--out", str(out), "--overwrite"])
    assert [p.name for p in tmp_path.iterdir()] == ["demo"] and (out / "report.json").read_text() == "earlier run"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_swallowed_interrupt_still_cancels_the_run(tmp_path, monkeypatch, sig):
    """Python only prints a KeyboardInterrupt raised inside a gc callback or a destructor ("Exception
    ignored"): the run goes on, but it must not swap its output in, and it still ends interrupted."""
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = previous_output(tmp_path / "demo")

    def swallowed(args):
        with atomic_output_dir(args.out, overwrite=True) as staging:
            (staging / "report.json").write_text("new run")
            try:
                os.kill(os.getpid(), sig)
                time.sleep(5)  # the handler interrupts this
            except KeyboardInterrupt:
                pass  # what a gc callback does with it
        return 0
    monkeypatch.setattr(cli, "_demo", swallowed)
    try:
        with pytest.raises(KeyboardInterrupt, match="interrupted"):
            cli.main(["demo", "--out", str(out), "--overwrite"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"] and (out / "report.json").read_text() == "earlier run"

    def plain(args):  # the cancel is not carried over: the next run commits
        with atomic_output_dir(args.out, overwrite=True) as staging:
            (staging / "report.json").write_text("next run")
        return 0
    monkeypatch.setattr(cli, "_demo", plain)
    assert cli.main(["demo", "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.json").read_text() == "next run"


def test_an_ignored_sigint_stays_ignored():
    """nohup / background jobs ignore SIGINT on purpose: the CLI's handlers leave it so (SIGTERM
    still cancels)."""
    from zmagic_jax._io import interrupts_cancel_outputs

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_cancel_outputs():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def _start_demo(out):
    # As from a terminal: SIGINT handled by Python's default handler. A shell that starts a job in
    # the background (CI runners, `cmd &`) sets SIGINT to "ignore", every child inherits that, and
    # the CLI rightly leaves an ignored SIGINT alone (nohup), so Ctrl-C would never reach the demo.
    # (Set in the child's Python, not by a preexec_fn: forking a multithreaded JAX process is unsafe.)
    cli_args = ["demo", "--out", str(out), "--overwrite", *QUICK]
    code = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"sys.argv = ['zmagic'] + {cli_args!r}; runpy.run_module('zmagic_jax.cli', run_name='__main__')")
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for(predicate, timeout=240.0):
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "the demo did not reach the expected stage"
        time.sleep(0.005)


def _group_gone(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.xdist_group("interrupt")
def test_an_interrupted_demo_leaves_the_previous_output_intact(tmp_path):
    """The demo makes its staging folder before any work: interrupt it as soon as that exists."""
    out = previous_output(tmp_path / "demo")
    staging = lambda: [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    for sig in (signal.SIGINT, signal.SIGKILL):
        demo = _start_demo(out)
        _wait_for(lambda: staging() or demo.poll() is not None)
        assert demo.poll() is None, "the demo finished before it could be interrupted"
        os.killpg(demo.pid, sig)
        assert demo.wait(timeout=120) != 0
        _wait_for(lambda: _group_gone(demo.pid))  # no process of the run outlives it
        assert (out / "report.json").read_text() == "earlier run"
        if sig == signal.SIGINT:  # Ctrl-C cleans up after itself
            assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    # SIGKILL left its staging folder: the next run into the same folder removes it
    assert len(staging()) == 1
    with pytest.warns(RuntimeWarning, match="interrupted run"):
        check_output_dir(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
