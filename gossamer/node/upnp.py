"""UPnP port mapping: ask the home gateway to forward our listening port.

Only while reachability is ``private`` (a public node needs nothing, and
nodes on loopback never ask), only when ``upnp = true``, and only if we
listen on a non-loopback address.  Steps, all with deadlines:

1. SSDP ``M-SEARCH`` (one multicast UDP packet on the LAN) for an Internet
   Gateway Device; read the ``LOCATION`` of the first answer;
2. fetch its description (HTTP, at most 64 KiB, no DTDs/entities) and find
   the ``WANIPConnection`` / ``WANPPPConnection`` control URL;
3. SOAP ``GetExternalIPAddress`` and ``AddPortMapping`` (external port =
   listening port, TCP, lease ``LEASE_S``);
4. hand ``/ip4/<external ip>/tcp/<port>`` to reachability as a *candidate*:
   it is advertised only after a helper's dial-back reached us there (the
   verdict then becomes ``public`` with that address confirmed).

The mapping is renewed at half its lease and deleted when the node stops.
py-libp2p's ``UpnpManager`` needs ``miniupnpc`` (a C extension, not
installed with py-libp2p, and blocking); this is a small stdlib + trio
client instead.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit
from xml.etree import ElementTree

import trio

from gossamer.node.reachability import PRIVATE, Reachability, Verdict, tcp_multiaddr

if TYPE_CHECKING:
    from gossamer.node.node import Node

log = logging.getLogger(__name__)

SSDP_ADDR = ("239.255.255.250", 1900)
SEARCH_TARGETS = (
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
)
SERVICE_TYPES = ("WANIPConnection", "WANPPPConnection")
MAX_HTTP_BYTES = 64 * 1024
LEASE_S = 3600
RETRY_S = 300.0


class UpnpError(Exception):
    """The gateway is absent, malformed or refused."""


# ------------------------------------------------------------- pure helpers


def msearch(target: str, mx: int = 2) -> bytes:
    return (
        "M-SEARCH * HTTP/1.1\r\n"
        f"HOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
        'MAN: "ssdp:discover"\r\n'
        f"MX: {mx}\r\n"
        f"ST: {target}\r\n\r\n"
    ).encode()


def parse_ssdp_location(data: bytes) -> str | None:
    """The LOCATION header of an SSDP answer (http URLs only)."""
    try:
        text = data[:4096].decode("utf-8", "replace")
    except Exception:
        return None
    if not text.startswith("HTTP/1.1 200"):
        return None
    for line in text.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "location":
            url = value.strip()
            return url if urlsplit(url).scheme == "http" else None
    return None


def parse_control_url(location: str, xml: bytes) -> tuple[str, str]:
    """(control URL, service type) of the WAN connection service in a description."""
    root = _parse_xml(xml)
    base = location
    for element in root.iter():
        if _local(element.tag) == "URLBase" and element.text:
            base = element.text.strip()
    for service in root.iter():
        if _local(service.tag) != "service":
            continue
        fields = {_local(child.tag): (child.text or "").strip() for child in service}
        service_type = fields.get("serviceType", "")
        if any(kind in service_type for kind in SERVICE_TYPES) and fields.get("controlURL"):
            return urljoin(base, fields["controlURL"]), service_type
    raise UpnpError("the gateway offers no WANIPConnection/WANPPPConnection service")


def soap_body(service_type: str, action: str, args: dict[str, Any]) -> bytes:
    fields = "".join(f"<{k}>{_xml_escape(str(v))}</{k}>" for k, v in args.items())
    return (
        '<?xml version="1.0"?>'
        '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
        f'<s:Body><u:{action} xmlns:u="{_xml_escape(service_type)}">{fields}</u:{action}>'
        "</s:Body></s:Envelope>"
    ).encode()


def parse_soap_response(xml: bytes) -> dict[str, str]:
    root = _parse_xml(xml)
    out: dict[str, str] = {}
    for element in root.iter():
        tag = _local(element.tag)
        if tag in ("errorCode", "errorDescription") or tag.startswith("New"):
            out[tag] = (element.text or "").strip()
    return out


def _parse_xml(xml: bytes) -> ElementTree.Element:
    if len(xml) > MAX_HTTP_BYTES:
        raise UpnpError("gateway document too large")
    if b"<!DOCTYPE" in xml or b"<!ENTITY" in xml:
        raise UpnpError("gateway document declares a DTD or entities: refused")
    try:
        return ElementTree.fromstring(xml)
    except ElementTree.ParseError as exc:
        raise UpnpError(f"gateway sent malformed XML: {exc}") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# --------------------------------------------------------------------- I/O


async def _http(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """A tiny HTTP/1.1 client (Connection: close), bounded in size."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise UpnpError(f"unsupported gateway URL {url!r}")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    method = "POST" if body is not None else "GET"
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.hostname}:{port}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    stream = await trio.open_tcp_stream(parts.hostname, port)
    try:
        await stream.send_all(request)
        data = b""
        while len(data) <= MAX_HTTP_BYTES + 4096:
            chunk = await stream.receive_some(16384)
            if not chunk:
                break
            data += chunk
    finally:
        await stream.aclose()
    head, _, payload = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    match = re.match(rb"HTTP/1\.[01] (\d{3})", status)
    if match is None:
        raise UpnpError("gateway sent no HTTP status line")
    if b"transfer-encoding: chunked" in head.lower():
        payload = _dechunk(payload)
    code = int(match.group(1))
    if code >= 400 and code != 500:  # SOAP faults come as 500 with a body
        raise UpnpError(f"gateway answered HTTP {code}")
    return payload


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


class Gateway:
    """An Internet Gateway Device's WAN connection service."""

    def __init__(self, control_url: str, service_type: str, local_ip: str) -> None:
        self.control_url = control_url
        self.service_type = service_type
        self.local_ip = local_ip  # our address on the gateway's LAN

    @classmethod
    async def discover(cls, timeout: float) -> Gateway:
        location = await _ssdp_search(timeout)
        with trio.fail_after(timeout):
            xml = await _http(location)
        control_url, service_type = parse_control_url(location, xml)
        local_ip = _local_ip_towards(urlsplit(control_url).hostname or "")
        return cls(control_url, service_type, local_ip)

    async def call(self, action: str, timeout: float, **args: Any) -> dict[str, str]:
        body = soap_body(self.service_type, action, args)
        headers = {
            "Content-Type": 'text/xml; charset="utf-8"',
            "SOAPAction": f'"{self.service_type}#{action}"',
        }
        with trio.fail_after(timeout):
            answer = parse_soap_response(await _http(self.control_url, body, headers))
        if "errorCode" in answer:
            raise UpnpError(
                f"{action} refused: {answer.get('errorCode')} {answer.get('errorDescription', '')}"
            )
        return answer

    async def external_ip(self, timeout: float) -> str:
        answer = await self.call("GetExternalIPAddress", timeout)
        ip = answer.get("NewExternalIPAddress", "")
        try:
            socket.inet_aton(ip)
        except OSError:
            raise UpnpError(f"gateway reported a bad external address {ip!r}") from None
        return ip

    async def add_mapping(self, port: int, timeout: float, lease: int = LEASE_S) -> None:
        await self.call(
            "AddPortMapping",
            timeout,
            NewRemoteHost="",
            NewExternalPort=port,
            NewProtocol="TCP",
            NewInternalPort=port,
            NewInternalClient=self.local_ip,
            NewEnabled=1,
            NewPortMappingDescription="gossamer",
            NewLeaseDuration=lease,
        )

    async def delete_mapping(self, port: int, timeout: float) -> None:
        await self.call(
            "DeletePortMapping",
            timeout,
            NewRemoteHost="",
            NewExternalPort=port,
            NewProtocol="TCP",
        )


async def _ssdp_search(timeout: float) -> str:
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        await sock.bind(("0.0.0.0", 0))
        for target in SEARCH_TARGETS:
            await sock.sendto(msearch(target), SSDP_ADDR)
        with trio.move_on_after(timeout):
            while True:
                data, _ = await sock.recvfrom(4096)
                location = parse_ssdp_location(data)
                if location is not None:
                    return location
    raise UpnpError(f"no UPnP gateway answered in {timeout:g} s")


def _local_ip_towards(host: str) -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((host, 9))
        return probe.getsockname()[0]
    except OSError as exc:
        raise UpnpError(f"no route to the gateway {host}: {exc}") from None
    finally:
        probe.close()


# -------------------------------------------------------------- the manager


class PortMapper:
    """Keeps a verified UPnP mapping while the node is private."""

    def __init__(self, node: Node, reachability: Reachability) -> None:
        self._node = node
        self._reachability = reachability
        self._wake = trio.Event()
        self.gateway: Gateway | None = None
        self.mapped: str | None = None  # /ip4/<external>/tcp/<port> handed to reachability
        self.port: int | None = None
        self.state = "off" if not node.config.upnp else "idle"
        self.error = ""
        self._renew_at = 0.0

    def start(self) -> None:
        node = self._node
        if not node.config.upnp:
            return
        self._reachability.subscribe(self._on_verdict)
        node.on_close(self._close)
        node.nursery.start_soon(self._run)

    def status(self) -> dict[str, Any]:
        verified = bool(self.mapped and self.mapped in self._reachability.verdict.confirmed_addrs)
        return {
            "state": self.state,
            "mapped": self.mapped,
            "verified": verified,
            "error": self.error,
        }

    def _on_verdict(self, verdict: Verdict) -> None:
        self._wake.set()

    def _listen_port(self) -> int | None:
        for ip, port in self._node.host.tcp_listeners():
            if not (ip.startswith("127.") or ip == "::1" or ":" in ip):
                return port
        return None

    async def _run(self) -> None:
        while True:
            self._wake = trio.Event()
            wait = RETRY_S
            if self._reachability.status == PRIVATE or self.mapped is not None:
                try:
                    wait = await self._step()
                except (UpnpError, OSError, trio.TooSlowError) as exc:
                    self.state, self.error = "unavailable", str(exc) or type(exc).__name__
                    log.info("UPnP port mapping unavailable: %s", self.error)
                    wait = RETRY_S
            with trio.move_on_after(wait):
                await self._wake.wait()

    async def _step(self) -> float:
        node = self._node
        timeout = node.config.upnp_timeout
        port = self._listen_port()
        if port is None:
            self.state = "not listening on a LAN address"
            return RETRY_S
        if self.mapped is not None and time.monotonic() < self._renew_at:
            return self._renew_at - time.monotonic()
        if self.gateway is None:
            self.state = "searching"
            self.gateway = await Gateway.discover(timeout)
        try:
            external = await self.gateway.external_ip(timeout)
            await self.gateway.add_mapping(port, timeout)
        except (UpnpError, OSError, trio.TooSlowError):
            self.gateway = None  # rediscover next time
            raise
        self.port = port
        self._renew_at = time.monotonic() + LEASE_S / 2
        addr = tcp_multiaddr(external, port)
        if addr != self.mapped:
            if self.mapped is not None:
                self._reachability.remove_candidate(self.mapped)
            self.mapped = addr
            self._reachability.add_candidate(addr)
            log.info("UPnP gateway maps %s to us; verifying by dial-back", addr)
        self.state, self.error = "mapped", ""
        return LEASE_S / 2

    async def _close(self) -> None:
        if self.gateway is not None and self.port is not None:
            try:
                await self.gateway.delete_mapping(self.port, self._node.config.upnp_timeout)
            except (UpnpError, OSError, trio.TooSlowError) as exc:
                log.debug("UPnP mapping removal failed: %s", exc)
