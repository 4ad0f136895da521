"""Who the web page counts as local, without a node: a loopback address asking by a loopback name."""

from __future__ import annotations

from llm_provider.ui_api import is_local


def test_only_a_loopback_address_asking_by_a_loopback_name_is_local() -> None:
    # The tests' servers listen on loopback only: a browser elsewhere is this function's to tell apart.
    for remote, host in (("127.0.0.1", "127.0.0.1:8081"), ("127.0.0.1", "localhost:8081"), ("::1", "[::1]:8081"),
                         ("::ffff:127.0.0.1", "LOCALHOST"), ("127.0.0.2", "127.0.0.1")):
        assert is_local(remote, host), (remote, host)
    for remote, host in (("10.1.2.3", "127.0.0.1:8081"), ("127.0.0.1", "node.example:8081"), ("127.0.0.1", ""),
                         ("unknown", "localhost"), ("127.0.0.1", "127.0.0.1.evil.example")):
        assert not is_local(remote, host), (remote, host)
