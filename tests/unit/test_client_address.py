"""The client address that per-address limits and aggregate audit records are keyed by."""

from __future__ import annotations

import pytest

from liveness_proxy.middleware import client_address


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (("203.0.113.9", 5000), "203.0.113.9"),
        (("2001:db8:1:2:3:4:5:6", 5000), "2001:db8:1:2::/64"),
        (("2001:db8:1:2::ffff", 1), "2001:db8:1:2::/64"),  # the same subscriber's /64
        (("::1", 1), "::/64"),
        (("::ffff:198.51.100.4", 1), "198.51.100.4"),  # a dual-stack socket's IPv4 client
        (("::ffff:198.51.100.5", 1), "198.51.100.5"),
        (("64:ff9b::203.0.113.1", 1), "203.0.113.1"),  # NAT64
        (("fe80::1%eth0", 1), "fe80::/64"),  # a scoped address: its /64 too
        (("x" * 500, 1), "x" * 64),
        (None, "unknown"),
    ],
)
def test_the_client_address_is_the_servers_with_ipv6_by_64(
    client: tuple[str, int] | None, expected: str
) -> None:
    assert client_address({"type": "http", "client": client}) == expected
