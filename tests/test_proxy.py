"""The client address behind a proxy (issue 13 item 2, D2): the right-most X-Forwarded-For entry
that is not itself a trusted proxy, under each TRUST_PROXY setting, for each header form."""

from __future__ import annotations

import types

import pytest
from multidict import CIMultiDict

import whatstracking
from whatstracking import ConfigError, client_ip, load_config

NGINX = "127.0.0.1"  # a proxy on this host
PEER = None  # expected: the peer itself (the proxy)
BALANCER = "198.51.100.9"  # a load balancer elsewhere (not loopback)


def request(remote: str | None, *forwarded: str, trust: str = "loopback"):
    """What client_ip reads of a request: the peer, the headers and the config."""
    config = load_config({"TRUST_PROXY": trust})
    headers = CIMultiDict(("X-Forwarded-For", value) for value in forwarded)
    return types.SimpleNamespace(app={whatstracking.CONFIG: config}, remote=remote,
                                 headers=headers)


@pytest.mark.parametrize("value,mode", [
    ("", "loopback"), ("loopback", "loopback"), ("LOOPBACK", "loopback"),
    ("true", "true"), ("yes", "true"), ("1", "true"), ("on", "true"),
    ("false", "false"), ("no", "false"), ("0", "false"), ("off", "false"),
])
def test_trust_proxy_takes_loopback_and_the_old_true_false_values(value, mode):
    assert load_config({"TRUST_PROXY": value}).trust_proxy == mode


def test_a_bad_trust_proxy_is_one_sentence_naming_the_choices():
    with pytest.raises(ConfigError) as info:
        load_config({"TRUST_PROXY": "nginx"})
    assert str(info.value) == "TRUST_PROXY must be loopback, true or false, not 'nginx'."


@pytest.mark.parametrize("forwarded,expected", [
    # no header, or an empty one: the proxy itself
    ((), PEER),
    (("",), PEER),
    # a single entry: what nginx appends for a client that sent none
    (("81.2.69.160",), "81.2.69.160"),
    # the client's own (forged) entries are left of the one the proxy appended
    (("1.2.3.4, 81.2.69.160",), "81.2.69.160"),
    (("10.0.0.1, 8.8.8.8, 81.2.69.160",), "81.2.69.160"),
    # spaces or none around the commas
    (("1.2.3.4,81.2.69.160",), "81.2.69.160"),
    (("  1.2.3.4 ,   81.2.69.160  ",), "81.2.69.160"),
    # two header lines are one list, in order
    (("1.2.3.4", "81.2.69.160"), "81.2.69.160"),
    # another proxy on this host in the chain (loopback) is passed over
    (("81.2.69.160, 127.0.0.1",), "81.2.69.160"),
    (("81.2.69.160, ::1",), "81.2.69.160"),
    # IPv6: keyed by the /64; brackets and ports as some proxies write them
    (("2001:db8:1:2::7",), "2001:db8:1:2::/64"),
    (("2001:DB8:1:2:aaaa:bbbb:cccc:dddd",), "2001:db8:1:2::/64"),
    (("[2001:db8:1:2::7]:443",), "2001:db8:1:2::/64"),
    (("81.2.69.160:51234",), "81.2.69.160"),
    (("::ffff:81.2.69.160",), "81.2.69.160"),
    # garbage: never a bucket of its own; reading stops at the last address we can believe
    (("garbage",), PEER),
    (("unknown, 81.2.69.160",), "81.2.69.160"),
    (("81.2.69.160, unknown",), PEER),
    (("1.2.3.4, , 127.0.0.1",), "127.0.0.1"),
    (("1.2.3.4, 999.1.1.1",), PEER),
    (("<script>",), PEER),
])
def test_behind_a_local_proxy_the_client_is_the_rightmost_entry_not_a_proxy(forwarded, expected):
    for peer, key in ((NGINX, NGINX), ("::1", "::/64")):
        assert client_ip(request(peer, *forwarded)) == (expected or key)


def test_a_chain_of_only_local_proxies_is_a_local_client():
    assert client_ip(request(NGINX, "127.0.0.5, 127.0.0.1")) == "127.0.0.5"


@pytest.mark.parametrize("trust", ["loopback", "false"])
def test_a_peer_that_is_not_a_trusted_proxy_is_the_client_whatever_it_forwards(trust):
    for peer in (BALANCER, "10.0.0.2", "2001:db8::5"):
        key = "2001:db8::/64" if ":" in peer else peer
        assert client_ip(request(peer, "81.2.69.160", trust=trust)) == key
        assert client_ip(request(peer, trust=trust)) == key


def test_trust_proxy_false_ignores_the_header_even_from_a_local_proxy():
    assert client_ip(request(NGINX, "81.2.69.160", trust="false")) == NGINX


def test_trust_proxy_true_believes_any_peer_and_passes_over_internal_hops():
    assert client_ip(request(BALANCER, "81.2.69.160", trust="true")) == "81.2.69.160"
    assert client_ip(request(BALANCER, "1.2.3.4, 81.2.69.160", trust="true")) == "81.2.69.160"
    # load balancer → internal balancer (10.0.0.1, appended by the next hop) → us
    assert client_ip(request("10.0.0.2", "1.2.3.4, 81.2.69.160, 10.0.0.1",
                             trust="true")) == "81.2.69.160"
    assert client_ip(request(BALANCER, trust="true")) == BALANCER
    assert client_ip(request(BALANCER, "garbage", trust="true")) == BALANCER


def test_no_peer_address_is_one_bucket():
    assert client_ip(request(None, "81.2.69.160", trust="false")) == "unknown"


async def test_eighty_visitors_behind_a_local_proxy_are_eighty_buckets(aiohttp_client,
                                                                       make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(RATE_LIMIT_PUBLIC="1")))
    for n in range(80):  # the test client connects from 127.0.0.1: a proxy on this host
        resp = await client.get("/public/get-connection?connectionId=x",
                                headers={"X-Forwarded-For": f"203.0.113.{n}"})
        assert resp.status == 404, n
    resp = await client.get("/public/get-connection?connectionId=x",
                            headers={"X-Forwarded-For": "203.0.113.5"})
    assert resp.status == 429


async def test_a_forged_leftmost_entry_buys_no_new_bucket(aiohttp_client, make_config):
    client = await aiohttp_client(whatstracking.create_app(make_config(RATE_LIMIT_PUBLIC="3")))
    statuses = []
    for n in range(6):  # what nginx forwards when the client sends its own header
        resp = await client.get("/public/get-connection?connectionId=x",
                                headers={"X-Forwarded-For": f"10.0.{n}.1, 81.2.69.160"})
        statuses.append(resp.status)
    assert statuses == [404, 404, 404, 429, 429, 429]
