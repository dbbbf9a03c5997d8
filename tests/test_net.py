"""Tests for tally.ops.net's one stale Unix-socket probe (used by the CA, the agent and the proxy)."""

import socket

import pytest

from tally.ops.net import ListenError, clear_stale_unix


def test_nothing_there_is_left_alone(tmp_path):
    clear_stale_unix(tmp_path / "s.sock")
    assert not (tmp_path / "s.sock").exists()


def test_a_stale_socket_is_removed(tmp_path):
    path = tmp_path / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # bound, never listened, now closed: nobody answers
    clear_stale_unix(path)
    assert not path.exists()


def test_a_live_socket_is_refused(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ListenError, match="another process is serving it"):
            clear_stale_unix(path)
    assert path.exists()


def test_a_symlink_or_a_file_is_refused(tmp_path):
    target = tmp_path / "file"
    target.write_text("keep")
    link = tmp_path / "link.sock"
    link.symlink_to(target)
    with pytest.raises(ListenError, match="symlink"):
        clear_stale_unix(link)
    with pytest.raises(ListenError, match="non-socket"):
        clear_stale_unix(target)
    assert target.read_text() == "keep"
