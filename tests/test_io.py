"""zhlm.io's writers: atomic renames, checksummed files, a full disk named as such, stale temporary
files, and the permissions of final files."""
import errno
import json
import os
import shutil
import subprocess
from collections import namedtuple

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from zhlm import io
from zhlm.io import (
    CorruptFile,
    atomic_path,
    read_checked,
    read_parquet,
    remove_stale_temps,
    verify_checked,
    write_bytes,
    write_checked,
    write_json,
    write_parquet,
)
from zhlm.model import LlamaForCausalLM, ModelConfig, save_model
from zhlm.train.loop import read_checkpoint, save_checkpoint

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 2}


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# --- checked files ------------------------------------------------------------

def test_a_checked_file_reads_back_and_any_damage_is_named(tmp_path):
    path = tmp_path / "state.bin"
    payload = np.random.default_rng(0).bytes(100_000)
    write_checked(path, payload)
    assert read_checked(path) == payload and verify_checked(path) == len(payload)

    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    for check in (read_checked, verify_checked):
        with pytest.raises(CorruptFile, match=f"{path}: truncated"):
            check(path)

    flipped = bytearray(data)
    middle = len(data) // 2
    assert any(flipped[middle:middle + 4096])
    flipped[middle:middle + 4096] = bytes(4096)
    path.write_bytes(bytes(flipped))
    for check in (read_checked, verify_checked):
        with pytest.raises(CorruptFile, match=f"{path}: checksum mismatch"):
            check(path)

    path.write_bytes(payload)  # a file written without the header
    with pytest.raises(CorruptFile, match="not a checked file"):
        read_checked(path)


def test_write_checked_runs_before_rename_once_the_new_file_is_verified_and_the_old_one_is_in_place(tmp_path):
    path = tmp_path / "state.bin"
    write_checked(path, b"first")
    seen = []

    def before_rename():
        (temp,) = [p for p in tmp_path.iterdir() if p != path]
        seen.append((read_checked(path), read_checked(temp)))

    write_checked(path, b"second", before_rename=before_rename)
    assert seen == [(b"first", b"second")] and read_checked(path) == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


# --- atomic writes ---------------------------------------------------------------

def test_a_failed_write_leaves_the_previous_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "out.json"
    write_json({"v": 1}, path)
    with pytest.raises(RuntimeError, match="writer broke"), atomic_path(path) as tmp:
        tmp.write_text("partial")
        raise RuntimeError("writer broke")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_final_files_get_the_umask_permissions_whatever_the_writer_gave_them(tmp_path, umask_027):
    """safetensors' save_file created model.safetensors with 0600: a group could not read the model."""
    save_model(LlamaForCausalLM(ModelConfig(vocab_size=50, **TINY)), tmp_path / "model")
    write_parquet(pa.table({"a": [1]}), tmp_path / "t.parquet")
    write_json({}, tmp_path / "t.json")
    write_bytes(tmp_path / "t.bin", b"x")
    with atomic_path(tmp_path / "private.bin") as tmp:  # a writer that makes its file private, as tempfile does
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))
    files = [*sorted((tmp_path / "model").iterdir()), *sorted(p for p in tmp_path.iterdir() if p.is_file())]
    assert len(files) == 6
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(umask_027) for p in files}


# --- stale temporary files -------------------------------------------------------

def test_remove_stale_temps_removes_those_of_dead_writers_only(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    names = [f".model.safetensors.tmp{dead}", f".loss.png.tmp{dead}", f".train_log.csv.tmp{alive}",
             f".config.json.tmp{os.getpid()}", ".tmpAb3xY9", "model.safetensors", f"x.tmp{dead}"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".model.safetensors.tmp{dead}", f".loss.png.tmp{dead}",
                                                      ".tmpAb3xY9"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".train_log.csv.tmp{alive}", f".config.json.tmp{os.getpid()}", "model.safetensors", f"x.tmp{dead}"])


def test_writing_a_file_removes_the_stale_temporary_files_of_that_file(tmp_path):
    dead = dead_pid()
    (tmp_path / f".a.parquet.tmp{dead}").write_text("left by a killed job")
    (tmp_path / f".b.parquet.tmp{dead}").write_text("another file's, left for its own writer")
    write_parquet(pa.table({"x": [1, 2]}), tmp_path / "a.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.parquet.tmp{dead}", "a.parquet"]


# --- a full disk -----------------------------------------------------------------

Usage = namedtuple("Usage", "total used free")


def test_an_error_that_hides_a_full_disk_is_reported_as_enospc(tmp_path, monkeypatch):
    """torch.save says "basic_ios::clear: iostream error" when the disk fills: the free space decides."""
    target = tmp_path / "ckpt.pt"
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: Usage(10_000, 9_000, 1_000))
    with pytest.raises(OSError, match=rf"No space left on device writing {target}: needs ~5,000 bytes, 1,000 free") \
            as raised, atomic_path(target, size=5_000) as tmp:
        tmp.write_bytes(b"x" * 100)
        raise RuntimeError("basic_ios::clear: iostream error")
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value.__cause__, RuntimeError)
    assert not list(tmp_path.iterdir())

    with pytest.raises(OSError, match="needs more than the 100 bytes written, 1,000 free"), atomic_path(target) as tmp:
        tmp.write_bytes(b"x" * 100)
        raise RuntimeError("basic_ios::clear: iostream error")


def test_other_errors_keep_their_own_cause(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="a bug"), atomic_path(target, size=10):
        raise RuntimeError("a bug")  # plenty of room: not a full disk
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: Usage(10_000, 10_000, 0))
    with pytest.raises(PermissionError), atomic_path(target):
        raise PermissionError(errno.EACCES, "Permission denied")  # its errno names its cause


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, for a disk that really fills up."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a 1 MiB tmpfs for a full disk needs root and mount(8)")
    run = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if run.returncode:
        pytest.skip(f"cannot mount a 1 MiB tmpfs for a full disk here: {run.stderr.strip()}")
    yield mount
    # Lazily: a memory map of a weights file, or a failed writer's handle kept by a traceback,
    # may still hold the mount; it goes once they are collected.
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def assert_enospc(raised, path, size=None):
    error = raised.value
    assert error.errno == errno.ENOSPC, error
    assert f"No space left on device writing {path}: needs " in str(error) and " free" in str(error)
    if size is not None:
        assert f"needs ~{size:,} bytes" in str(error)


def test_a_full_disk_during_a_checkpoint_names_the_file_and_keeps_the_previous_checkpoint(tiny_fs):
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 100)).sum().backward()
    optimizer.step()
    save_checkpoint(tiny_fs, model, optimizer, 1, [], "run")
    last = tiny_fs / "last.pt"
    size = last.stat().st_size
    # Fill the disk, leaving room for half a checkpoint.
    filler = tiny_fs / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(tiny_fs).free - size // 2))
    with pytest.raises(OSError) as raised:
        save_checkpoint(tiny_fs, model, optimizer, 2, [], "run")  # the same size as the first
    assert_enospc(raised, last, size)
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["filler", "last.pt"]
    verify_checked(last)
    assert read_checkpoint(last)["step"] == 1


def test_a_full_disk_during_a_model_save_names_the_file_and_keeps_the_previous_weights(tiny_fs):
    small = LlamaForCausalLM(ModelConfig(vocab_size=50, **TINY))
    save_model(small, tiny_fs)
    big = LlamaForCausalLM(ModelConfig(vocab_size=8000, **TINY))  # 1 MiB of weights: does not fit
    with pytest.raises(OSError) as raised:
        save_model(big, tiny_fs)
    assert_enospc(raised, tiny_fs / "model.safetensors")
    weights = load_file(str(tiny_fs / "model.safetensors"))
    assert all(torch.equal(weights[k], v) for k, v in small.state_dict().items() if k in weights)
    assert json.loads((tiny_fs / "config.json").read_text())["vocab_size"] == 50, "weights and config still match"
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["config.json", "model.safetensors"]


def test_a_full_disk_during_a_parquet_write_or_a_torch_save_names_the_file(tiny_fs):
    path = tiny_fs / "rows.parquet"
    write_parquet(pa.table({"x": [1.0, 2.0]}), path)
    noise = np.random.default_rng(0).random(300_000)  # 2.4 MB that zstd cannot shrink
    with pytest.raises(OSError) as raised:
        write_parquet(pa.table({"x": noise}), path)
    assert_enospc(raised, path)
    assert read_parquet(path).column("x").to_pylist() == [1.0, 2.0]
    # torch.save to a path hides the cause ("unexpected pos", "iostream error"): it is named all the same.
    with pytest.raises(OSError) as raised, atomic_path(tiny_fs / "state.pt") as tmp:
        torch.save({"x": torch.randn(300_000)}, tmp)
    assert_enospc(raised, tiny_fs / "state.pt")
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["rows.parquet"]
