"""The library's one ``fsync_dir`` (data stores, atomic JSON writes and checkpoints share it)."""
import errno
import os

import pytest

from blockyard.data import _safetensors
from blockyard.data._safetensors import fsync_dir
from blockyard.train import checkpoint


def test_one_definition_shared_with_checkpoints():
    assert checkpoint.fsync_dir is fsync_dir


def test_fsyncs_an_existing_directory(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(_safetensors.os, "fsync", lambda fd: calls.append(fd) or real(fd))
    fsync_dir(tmp_path)
    fsync_dir(str(tmp_path))
    assert len(calls) == 2


def test_missing_directory_raises_off_windows(tmp_path):
    if os.name == "nt":
        pytest.skip("Windows never opens the directory")
    with pytest.raises(FileNotFoundError, match="absent"):
        fsync_dir(tmp_path / "absent")


def test_windows_cannot_open_a_directory_and_returns(tmp_path, monkeypatch):
    def refuse(path, flags):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(_safetensors.os, "open", refuse)
    monkeypatch.setattr(_safetensors.os, "name", "nt")
    assert fsync_dir(tmp_path) is None


@pytest.mark.parametrize("code, tolerated", [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EIO, False)])
def test_filesystem_without_directory_fsync_is_tolerated_but_io_errors_raise(tmp_path, monkeypatch, code, tolerated):
    closed = []
    real_close = os.close

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_safetensors.os, "fsync", failing_fsync)
    monkeypatch.setattr(_safetensors.os, "close", lambda fd: closed.append(fd) or real_close(fd))
    if tolerated:
        fsync_dir(tmp_path)
    else:
        with pytest.raises(OSError, match=os.strerror(code)) as info:
            fsync_dir(tmp_path)
        assert info.value.errno == code
    assert len(closed) == 1  # the descriptor is closed either way
