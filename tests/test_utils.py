"""All-or-nothing writes and the cache location."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from hf_compress.utils import atomic_directory, atomic_file, cache_dir, check_save_dir, file_lock
from lock_holder import held_by_another_process


def test_atomic_file_replaces_only_on_success(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as handle:
            handle.write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]
    with atomic_file(target) as handle:
        handle.write("new")
    assert target.read_text() == "new"
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable by others, unlike mkstemp's 0600


def test_atomic_directory_leaves_nothing_on_failure_and_refuses_existing(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):  # parent folders the save created go too; the ones that existed stay
        with atomic_directory(tmp_path / "runs" / "new" / "model"):
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as staging:
        (staging / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    with pytest.raises(FileExistsError, match="already holds a model.*overwrite=True"):
        with atomic_directory(target):
            pass
    (target / "notes.txt").write_text("mine")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "weights").write_text("new")
    # the old config (part of the replaced artifact) goes, the user's notes stay
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    # Nested artifacts of the old save (expert_2/ of 3 experts, overwritten by 2) go whole; the user's folders stay.
    for name in ("expert_0", "expert_1", "expert_2"):
        (target / name).mkdir()
        (target / name / "adapter_config.json").write_text("{}")
        (target / name / "adapter_model.safetensors").write_text("old")
    (target / "results").mkdir()
    (target / "results" / "scores.json").write_text("{}")
    with atomic_directory(target, overwrite=True) as staging:
        for name in ("expert_0", "expert_1"):
            (staging / name).mkdir()
            (staging / name / "adapter_config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["expert_0", "expert_1", "notes.txt", "results", "weights"]
    assert sorted(p.name for p in (target / "expert_0").iterdir()) == ["adapter_config.json"]
    assert (target / "results" / "scores.json").read_text() == "{}"
    # Links (to a folder, to a file, dangling) stay links, and an empty folder stays.
    (tmp_path / "datasets").mkdir()
    (target / "datasets").symlink_to(tmp_path / "datasets")
    (target / "readme_link").symlink_to(target / "notes.txt")
    (target / "dangling").symlink_to(tmp_path / "nowhere")
    (target / "logs").mkdir()
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "weights").write_text("newer")
    assert sorted(p.name for p in target.iterdir()) == [
        "dangling", "datasets", "expert_0", "expert_1", "logs", "notes.txt", "readme_link", "results", "weights"]
    assert os.readlink(target / "datasets") == str(tmp_path / "datasets")
    assert (target / "readme_link").is_symlink() and (target / "readme_link").read_text() == "mine"
    assert (target / "dangling").is_symlink() and (target / "logs").is_dir()


def test_saved_files_get_normal_permissions_and_the_users_keep_theirs(tmp_path):
    # safetensors 0.8 writes owner-only files; a saved folder is meant to be shared like any other.
    import torch
    from safetensors.torch import save_file

    target = tmp_path / "model"
    target.mkdir()
    (target / "private.txt").write_text("mine")
    os.chmod(target / "private.txt", 0o600)
    with atomic_directory(target, overwrite=True) as staging:
        save_file({"weight": torch.zeros(2)}, str(staging / "model.safetensors"))
    expected = 0o666 & ~_umask()
    assert stat.S_IMODE(os.stat(target / "model.safetensors").st_mode) == expected
    assert stat.S_IMODE(os.stat(target / "private.txt").st_mode) == 0o600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_folder_of_other_files_needs_overwrite_and_keeps_them(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty .*holds no model"):
        with atomic_directory(notes):
            pass
    target = tmp_path / "out"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "results.json").write_text("{}")
    (target / "model-00002-of-00002.safetensors").write_text("old shard")
    (target / "recipe.yaml").write_text("name: another build")  # a recipe run's record of the old model
    (target / "recipe_results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="already holds a model"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "model.safetensors").write_text("new")
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["model.safetensors", "sub/results.json"]  # the stale shard and recipe record are dropped


def test_stale_staging_of_dead_writers_is_swept_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".model.tmp-{dead_pid}-abc123"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live = tmp_path / f".model.old-{os.getppid()}-xyz"
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid}-abc"
    other.mkdir()
    with atomic_directory(tmp_path / "model") as staging:
        (staging / "config.json").write_text("{}")
    assert not stale.exists() and live.exists() and other.exists()  # only the dead writer's entry of this target


def test_save_killed_at_any_point_leaves_the_previous_artifact_and_no_litter(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "weights.bin").write_bytes(b"v1" * 1000)
    writer = (
        "import sys, time; from hf_compress.utils import atomic_directory\n"
        "with atomic_directory(sys.argv[1], overwrite=True) as tmp:\n"
        "    (tmp / 'weights.bin').write_bytes(b'v2' * 1000)\n"
        "    print('staged', flush=True); time.sleep(60)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(target)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "staged"
    process.kill()  # SIGKILL: no cleanup runs
    process.wait()
    assert (target / "weights.bin").read_bytes() == b"v1" * 1000
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".model.tmp-")]) == 1  # the corpse
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "weights.bin").write_bytes(b"v3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_replacing_swaps_in_one_step(tmp_path, monkeypatch):
    from hf_compress.utils import files

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    renames = []
    real_rename = os.rename
    monkeypatch.setattr(files.os, "rename", lambda a, b: (renames.append((a, b)), real_rename(a, b)))
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "config.json").write_text("new")
    assert (target / "config.json").read_text() == "new"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if files._exchange(tmp_path / "a", tmp_path / "b"):
        assert renames == []  # renameat2(RENAME_EXCHANGE): the target never disappears
    else:  # fallback: the old folder goes aside only after the new one is complete
        assert len(renames) == 2 and renames[0][0] == target


def test_save_dir_checks_are_immediate_and_clear(tmp_path, unwritable_folder):
    with pytest.raises(PermissionError, match="save_dir .*not writable"):
        check_save_dir(unwritable_folder / "out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_save_dir(tmp_path / "file")
    with pytest.raises(OSError, match="MiB are needed"):
        check_save_dir(tmp_path / "new", expected_bytes=2**62)


def test_file_lock_excludes_a_second_holder(tmp_path):
    with held_by_another_process(tmp_path / "x.lock"):
        with pytest.raises(TimeoutError, match="busy"):
            with file_lock(tmp_path / "x.lock", timeout=0, busy_message="busy"):
                pass
    with file_lock(tmp_path / "x.lock", timeout=5):  # released when its holder died
        pass


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_CACHE", str(tmp_path / "c"))
    assert cache_dir("models") == tmp_path / "c" / "models" and (tmp_path / "c" / "models").is_dir()


def test_saved_folders_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_saves_read_the_umask_without_setting_it(tmp_path, monkeypatch):
    """os.umask(0), even set straight back, leaves the whole process at umask 0 for a moment: a file another thread
    creates then is world-writable. Where the kernel reports the umask, a save only reads it."""
    previous = os.umask(0o027)
    try:
        def no_umask_changes(mask):
            raise AssertionError(f"os.umask({mask:#o}) changed the process umask during a save")

        monkeypatch.setattr(os, "umask", no_umask_changes)
        with atomic_directory(tmp_path / "out") as staging:
            (staging / "config.json").write_text("{}")
        with atomic_file(tmp_path / "file.json") as handle:
            handle.write("{}")
        monkeypatch.undo()
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "file.json").stat().st_mode) == 0o640


def test_a_full_disk_is_named_with_the_folder_being_saved(tmp_path):
    """safetensors says only "I/O error: No space left on device (os error 28)", naming no folder."""
    import errno

    for raised in (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
                   OSError(errno.ENOSPC, "No space left on device")):
        with pytest.raises(OSError, match=f"no space left on the device of {tmp_path / 'out'} while saving") as info:
            with atomic_directory(tmp_path / "out"):
                raise raised
        assert info.value.errno == errno.ENOSPC and info.value.__cause__ is raised
    with pytest.raises(RuntimeError, match="something else"):  # other failures pass through as they are
        with atomic_directory(tmp_path / "out"):
            raise RuntimeError("something else")
    assert list(tmp_path.iterdir()) == []
