"""ssh:// addresses and the remote shell's quoting (no server needed)."""

from __future__ import annotations

import pytest

from edgec.device.remote import SshUrl, _remote_path
from edgec.errors import InputError


@pytest.mark.parametrize("url, user, host, port", [
    ("ssh://nvidia@192.168.1.20", "nvidia", "192.168.1.20", 22),
    ("ssh://pi@raspberrypi.local:2222", "pi", "raspberrypi.local", 2222),
    ("ssh://coral@[fe80::1]:22/", "coral", "fe80::1", 22),
    ("ssh://jetson", None, "jetson", 22),
])
def test_addresses(url, user, host, port):
    u = SshUrl.parse(url)
    assert (u.user, u.host, u.port) == (user, host, port)
    assert SshUrl.parse(str(u)) == u


@pytest.mark.parametrize("url", ["http://host", "ssh://", "ssh://u:secret@host", "ssh://host:99999", "ssh://host/path",
                                 "user@host"])
def test_bad_addresses_are_usage_errors(url):
    with pytest.raises(InputError) as exc:
        SshUrl.parse(url)
    assert exc.value.exit_code == 2 and "ssh://[user@]host[:port]" in exc.value.message


def test_remote_paths_expand_home_and_quote_the_rest():
    assert _remote_path("~/.cache/edgec") == '"$HOME"/.cache/edgec'
    assert _remote_path("/tmp/a b;rm -rf x") == "'/tmp/a b;rm -rf x'"
    assert _remote_path("~/it's") == '"$HOME"/' + "'it'\"'\"'s'"
