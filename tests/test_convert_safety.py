"""`bcnp.convert` never loses data: it never deletes its input, never replaces what it was not told to replace,
and every interruption (exception, Ctrl-C, SIGTERM, SIGKILL, a crash inside --force) leaves either the old or the
new model at OUT_DIR and no hidden copy that nobody cleans. Each case compares a sha256 of the tree before/after."""
import hashlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

import bcnp.convert
from bcnp.checkpoint import CheckpointError, read_model_dir
from bcnp.convert import MARKER, convert, signals_deferred, work_dir
from conftest import FIXTURES, sigint_as_from_a_terminal

REPO = FIXTURES.parent.parent
B7 = FIXTURES / "b7-rope-h4-l3-fp16" / "hf"


def digest(path):
    """sha256 of a tree: every name (links as links) and every file's bytes."""
    h, root = hashlib.sha256(), pathlib.Path(path)
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        if p.is_symlink():
            h.update(b"-> " + os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(*args, cwd=REPO, code=None):
    prefix = ["-c", code] if code else ["-m", "bcnp.convert"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, *prefix, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env)


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def work_dirs(parent):
    return sorted(p.name for p in pathlib.Path(parent).iterdir() if ".bcnp-" in p.name)


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


# --- the input is never inside what --force deletes ----------------------------------------------------------

@pytest.mark.parametrize("force", [[], ["--force"]])
def test_an_output_that_contains_the_input_is_refused(tmp_path, force):
    parent = tmp_path / "p"
    shutil.copytree(B7, parent / "hf")
    (parent / "notes.txt").write_text("mine")
    before = digest(parent)
    for out in (parent, parent / "hf", tmp_path):
        message = one_error_line(run_cli(parent / "hf", out, *force))
        assert "choose another output directory" in message and str(out) in message
    assert digest(parent) == before and work_dirs(tmp_path) == work_dirs(parent) == []


def test_shards_linked_from_inside_the_output_are_inputs_too(tmp_path):
    """The source directory lies elsewhere, but its shards are symlinks into OUT_DIR: --force must not delete it."""
    store, hf = tmp_path / "store", tmp_path / "hf"
    shutil.copytree(B7, store)
    shutil.copytree(B7, hf, ignore=shutil.ignore_patterns("*.bin"))
    for p in B7.glob("*.bin"):
        (hf / p.name).symlink_to(store / p.name)
    before = digest(store)
    message = one_error_line(run_cli(hf, store, "--force"))
    assert "pytorch_model-0000" in message and "which this conversion reads" in message
    assert digest(store) == before


def test_an_input_reached_through_a_symlink_is_still_recognised(tmp_path):
    parent = tmp_path / "p"
    shutil.copytree(B7, parent / "hf")
    (tmp_path / "link").symlink_to(parent / "hf")
    (tmp_path / "out-link").symlink_to(parent)
    before = digest(parent)
    assert "choose another output directory" in one_error_line(run_cli(tmp_path / "link", parent, "--force"))
    assert "symbolic link" in one_error_line(run_cli(parent / "hf", tmp_path / "out-link", "--force"))
    assert digest(parent) == before


def test_an_empty_output_name_writes_nothing_anywhere(tmp_path):
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    before = digest(tmp_path)
    assert "names no directory" in one_error_line(run_cli(B7, "", cwd=cwd))
    assert "names no directory" in one_error_line(run_cli(B7, "/", "--force", cwd=cwd))
    assert digest(tmp_path) == before


# --- the final rename replaces only what it was told to --------------------------------------------------------

def during_conversion(monkeypatch, action):
    """Run `action` while the weights are being written (another process acting meanwhile)."""
    write_weights = bcnp.convert.write_weights

    def acting_midway(*args):
        write_weights(*args)
        action()

    monkeypatch.setattr(bcnp.convert, "write_weights", acting_midway)


def test_an_output_someone_fills_meanwhile_is_not_replaced(tmp_path, monkeypatch):
    out = tmp_path / "out"
    during_conversion(monkeypatch, lambda: (out.mkdir(), (out / "theirs.txt").write_text("theirs")))
    with pytest.raises(FileExistsError, match="appeared during the conversion .* left untouched"):
        convert(B7, out, progress=False)
    assert os.listdir(out) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    assert work_dirs(tmp_path) == []


def test_with_force_only_the_directory_found_at_the_start_is_replaced(tmp_path, monkeypatch):
    out, moved = tmp_path / "out", tmp_path / "moved"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def someone_swaps_it():
        out.rename(moved)
        out.mkdir()
        (out / "new.txt").write_text("theirs")

    during_conversion(monkeypatch, someone_swaps_it)
    with pytest.raises(FileExistsError, match="replaced by another process"):
        convert(B7, out, force=True, progress=False)
    assert os.listdir(out) == ["new.txt"] and os.listdir(moved) == ["old.txt"]
    assert work_dirs(tmp_path) == []


def test_an_empty_directory_that_appears_meanwhile_is_taken(tmp_path, monkeypatch):
    out = tmp_path / "out"
    during_conversion(monkeypatch, out.mkdir)                       # nothing in it that could be lost
    convert(B7, out, progress=False)
    assert read_model_dir(out)[1]["format_version"] == 2 and work_dirs(tmp_path) == []


def test_an_existing_output_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        convert(B7, out, progress=False)
    assert os.listdir(out) == ["precious.txt"]
    convert(B7, out, force=True, progress=False)
    assert "precious.txt" not in os.listdir(out) and (out / "model.safetensors").exists()
    assert MARKER not in os.listdir(out) and work_dirs(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(B7, empty, progress=False)                              # an empty directory is fine without --force
    with pytest.raises(FileExistsError, match="exists and is not a directory"):
        convert(B7, out / "config.json", force=True, progress=False)


# --- failures and interruptions leave nothing, or the next run cleans it ---------------------------------------

def test_a_failing_conversion_leaves_no_directory(tmp_path):
    source = shutil.copytree(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", tmp_path / "hf")
    shard = source / "pytorch_model-00003-of-00003.bin"
    shard.write_bytes(shard.read_bytes()[:-5000])                   # truncated: refused before anything is written
    with pytest.raises(CheckpointError, match="pytorch_model-00003-of-00003.bin"):
        convert(source, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and work_dirs(tmp_path) == []


def test_an_interrupted_conversion_leaves_no_directory(tmp_path, monkeypatch):
    write_shard, calls = bcnp.convert.write_shard, []

    def interrupted_after_two_shards(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[0])
        write_shard(*args)

    monkeypatch.setattr(bcnp.convert, "write_shard", interrupted_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        convert(B7, tmp_path / "out", max_shard_bytes=50_000, progress=False)
    assert len(calls) == 2 and ".out.bcnp-tmp-" in calls[0] and not os.path.exists(calls[0])
    assert not (tmp_path / "out").exists() and work_dirs(tmp_path) == []


SLOW = """import sys, time, bcnp.convert as c
write_shard = c.write_shard
def slow(*args):
    write_shard(*args)
    print("shard", flush=True)
    time.sleep(60)
c.write_shard = slow
sys.exit(c.main(sys.argv[1:]))
"""


def convert_and_signal(tmp_path, signum):
    """Start a conversion that pauses after its first shard, send it `signum` there, wait for it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", SLOW, str(B7), str(tmp_path / "out"), "--max-shard-gb", "1e-4"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             preexec_fn=sigint_as_from_a_terminal)
    assert child.stdout.readline() == "shard\n"
    tmp = pathlib.Path(work_dir(str(tmp_path / "out"), "tmp", child.pid))
    assert (tmp / MARKER).exists() and list(tmp.glob("model-*.safetensors"))
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    return child.returncode, err, tmp


@pytest.mark.parametrize("signum, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_clean_up(tmp_path, signum, rc):
    returncode, err, _ = convert_and_signal(tmp_path, signum)
    assert returncode == rc and err.strip().splitlines()[-1] == "error: interrupted; nothing was written"
    assert work_dirs(tmp_path) == [] and not (tmp_path / "out").exists()


def test_what_sigkill_leaves_the_next_run_removes(tmp_path, capsys):
    returncode, _, tmp = convert_and_signal(tmp_path, signal.SIGKILL)
    assert returncode == -signal.SIGKILL and tmp.exists()           # nothing can run on SIGKILL
    convert(B7, tmp_path / "out", progress=False)
    assert work_dirs(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").exists()
    assert f"removed {tmp}, left by an interrupted conversion" in capsys.readouterr().err


def test_leftovers_that_may_not_be_ours_are_reported_with_the_command_that_removes_them(tmp_path, capsys):
    out = tmp_path / "out"
    stranger = pathlib.Path(work_dir(str(out), "tmp", dead_pid()))  # our naming, but no marker: not deleted
    stranger.mkdir()
    (stranger / "data").write_text("?")
    running = pathlib.Path(work_dir(str(out), "tmp", os.getppid()))  # a live process's: not a leftover
    running.mkdir()
    (running / MARKER).write_text(json.dumps({"written_by": "bcnp.convert", "pid": os.getppid()}))
    empty = pathlib.Path(work_dir(str(out), "tmp", dead_pid()))      # killed before its marker: nothing to lose
    empty.mkdir()
    convert(B7, out, progress=False)
    err = capsys.readouterr().err
    assert f"remove it with: rm -rf -- {stranger}" in err and (stranger / "data").read_text() == "?"
    assert f"{running}: another conversion to {out}" in err and running.exists()
    assert f"removed {empty}" in err and not empty.exists()


CRASH = """import os, sys, bcnp.convert as c
set_aside, remove_ours, where = c.set_aside, c.remove_ours, sys.argv.pop()
def crash_after_set_aside(*args):
    set_aside(*args)
    os._exit(9)
def crash_before_removing_the_old(path):
    if ".bcnp-old-" in path:
        os._exit(9)
    remove_ours(path)
c.set_aside = crash_after_set_aside if where == "between-renames" else set_aside
c.remove_ours = crash_before_removing_the_old if where == "while-deleting" else remove_ours
sys.exit(c.main(sys.argv[1:]))
"""


def test_a_force_that_dies_between_its_renames_gets_the_old_model_back(tmp_path, capsys):
    out = tmp_path / "out"
    convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", out, progress=False)
    before = digest(out)
    assert run_cli(B7, out, "--force", "between-renames", code=CRASH).returncode == 9
    assert not out.exists() and len(work_dirs(tmp_path)) == 2       # the old model is hidden, the new unfinished
    with pytest.raises(FileExistsError, match="--force"):
        convert(B7, out, progress=False)                            # the next run restores it, then refuses
    assert "restored" in capsys.readouterr().err
    assert digest(out) == before and work_dirs(tmp_path) == []


def test_a_force_that_dies_while_deleting_the_old_model_leaves_the_new_one(tmp_path, capsys):
    out = tmp_path / "out"
    convert(FIXTURES / "b13-alibi-h8-l4-bf16" / "hf", out, progress=False)
    assert run_cli(B7, out, "--force", "while-deleting", code=CRASH).returncode == 9
    assert read_model_dir(out)[0].hidden_size == 64                 # B7's: the new model is in place
    [old] = work_dirs(tmp_path)
    assert old.startswith(".out.bcnp-old-") and MARKER in os.listdir(tmp_path / old)
    new = digest(out)
    convert(B7, tmp_path / "other", progress=False)                 # a run for another OUT_DIR leaves it alone
    assert len(work_dirs(tmp_path)) == 1
    convert(B7, out, force=True, progress=False)
    assert "removed" in capsys.readouterr().err and work_dirs(tmp_path) == [] and digest(out) == new


def test_signals_wait_until_the_swap_is_done():
    previous = signal.getsignal(signal.SIGTERM)
    with signals_deferred() as caught:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)                                            # delivered here, and only recorded
    assert caught == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) == previous
