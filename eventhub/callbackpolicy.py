"""Where a callback may go: ``X-Callback-Url`` never reaches the hub's own networks.

A callback URL must be ``http`` or ``https`` with a host. Its host is checked twice: when the
invocation is requested (every address the name resolves to) and again when the callback is sent,
by the resolver of the callbacks' own HTTP client (:class:`GuardedResolver`). The connection then
goes to an address that was just checked, so a name re-pointed in between (DNS rebinding) gains
nothing. An address is refused when it is:

- loopback, private (RFC 1918, IPv6 unique-local), link-local (cloud metadata services live at
  169.254.169.254 and fd00:ec2::254), shared (100.64.0.0/10), unspecified, multicast, reserved,
  or in any other range IANA does not mark globally reachable;
- one of those in IPv6 form: IPv4-mapped (``::ffff:127.0.0.1``), 6to4, Teredo or NAT64
  (``64:ff9b::/96``) addresses are judged by the IPv4 address they carry.

``callback_allow`` lifts the refusal: an IP network entry (``10.0.0.0/8``, ``127.0.0.1``, ``::1``)
allows the addresses in it; a host name entry (``hooks.internal``, ``*.svc.cluster.local``) allows
that host whatever it resolves to.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from eventhub.errors import FieldProblem, InvalidInput, Unavailable

HEADER = "X-Callback-Url"
_RESOLVE_TIMEOUT = 5.0
_NO_SUCH_NAME = {
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)
}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class CallbackRefused(OSError):
    """A callback's host is, or resolves to, an address callbacks may not reach.

    An ``OSError`` so that aiohttp's connector reports it like any failed lookup."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_kind(address: Address) -> str | None:
    """Why ``address`` is refused as a callback destination (None: it is not)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            kind = address_kind(embedded)
            return f"{kind} (in IPv6 form)" if kind else None
    for kind, flag in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    ):
        if flag:
            return kind
    return None


def _parse_address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # without an IPv6 zone
    except ValueError:
        return None


def is_ip_literal(host: str) -> bool:
    return _parse_address(host) is not None


def _host_name(host: str) -> str:
    return host.rstrip(".").lower()


@dataclass(frozen=True)
class CallbackPolicy:
    """Which callback destinations are allowed besides public addresses."""

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # from "*.example.internal": ".example.internal"

    @classmethod
    def of(cls, allow: Iterable[str]) -> CallbackPolicy:
        networks: list[Network] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        for entry in allow:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
                continue
            except ValueError:
                pass
            name = _host_name(entry.strip())
            if name.startswith("*."):
                suffixes.append(name[1:])
            else:
                hosts.add(name)
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes))

    def host_allowed(self, host: str) -> bool:
        """Whether ``host`` (a name) is allowed whatever it resolves to."""
        name = _host_name(host)
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def refusal(self, address: str) -> str | None:
        """Why a connection to ``address`` (an IP literal) is refused; None when allowed."""
        parsed = _parse_address(address)
        if parsed is None:
            return "not an IP address"
        candidates: list[Address] = [parsed]
        if isinstance(parsed, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(parsed)):
            candidates.append(embedded)
        if any(a in n for a in candidates for n in self.networks if a.version == n.version):
            return None
        kind = address_kind(parsed)
        return f"{_article(kind)} {kind} address" if kind else None


@functools.lru_cache(maxsize=8)
def policy_of(allow: tuple[str, ...]) -> CallbackPolicy:
    return CallbackPolicy.of(allow)


def origin(url: URL) -> str:
    """``scheme://host:port`` of a URL: what logs may show (never credentials or a path)."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return f"{url.scheme}://{host}:{url.port}"


class GuardedResolver(AbstractResolver):
    """Resolves like aiohttp's default resolver, then refuses (``CallbackRefused``) a name with
    any address the policy refuses. aiohttp connects only to the addresses returned."""

    def __init__(self, policy: CallbackPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.host_allowed(host):
            return results
        for result in results:
            reason = self._policy.refusal(result["host"])
            if reason:
                raise CallbackRefused(f"{host} resolves to {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(f"{HEADER} {message}", problems=(FieldProblem(HEADER, message),))


def parse(value: str) -> URL:
    """The URL of an ``X-Callback-Url`` value; InvalidInput unless absolute http(s)."""
    try:
        url = URL(value)
        valid = url.scheme in ("http", "https") and bool(url.raw_host) and url.port is not None
    except ValueError:
        valid = False
    if not valid:
        raise _invalid("must be an absolute http(s) URL")
    return url


async def check(
    value: str, policy: CallbackPolicy, resolver: AbstractResolver | None = None
) -> URL:
    """Refuse (400 naming the header) a callback URL whose host is, or resolves to, a refused
    address; 503 when the name cannot be looked up just now."""
    url = parse(value)
    host = url.raw_host or ""
    if is_ip_literal(host):
        reason = policy.refusal(host)
        if reason:
            raise _invalid(f"must not point to {reason} (see callback_allow)")
        return url
    if policy.host_allowed(host):
        return url
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT):
            await GuardedResolver(policy, resolver).resolve(host, url.port or 0, socket.AF_UNSPEC)
    except CallbackRefused as exc:
        raise _invalid(
            f"must not point to an internal address: {exc} (see callback_allow)"
        ) from exc
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_NAME:
            raise _invalid(f"host {host} does not resolve") from exc
        raise Unavailable(f"{HEADER}: host {host} cannot be looked up now", retry_after=5) from exc
    except (TimeoutError, OSError) as exc:
        raise Unavailable(f"{HEADER}: host {host} cannot be looked up now", retry_after=5) from exc
    return url


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
