"""A minimal UPnP Internet Gateway Device for a NAT-lab router (root, in the router's namespace).

``python -m gossamer.bench._natlab_igd --lan-ip 10.1.0.1 --wan-ip 198.51.100.18``

Answers SSDP M-SEARCH on the LAN (239.255.255.250:1900), serves a device
description and a ``WANIPConnection:1`` control URL over HTTP on
``<lan-ip>:5000``, and implements ``GetExternalIPAddress``,
``AddPortMapping`` and ``DeletePortMapping`` with real iptables rules
(``DNAT`` in ``nat PREROUTING`` plus an ``ACCEPT`` in ``FORWARD``), so a
mapped port really is reachable from the lab's internet.  Prints ``ready``
on stdout once listening; exits when stdin closes.  A lab tool only: it
trusts its LAN.
"""

from __future__ import annotations

import argparse
import re
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICE = "urn:schemas-upnp-org:service:WANIPConnection:1"
DEVICE = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
HTTP_PORT = 5000

DESCRIPTION = """<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
 <specVersion><major>1</major><minor>0</minor></specVersion>
 <device>
  <deviceType>{device}</deviceType>
  <friendlyName>gossamer NAT lab gateway</friendlyName>
  <deviceList><device>
   <deviceType>urn:schemas-upnp-org:device:WANDevice:1</deviceType>
   <deviceList><device>
    <deviceType>urn:schemas-upnp-org:device:WANConnectionDevice:1</deviceType>
    <serviceList><service>
     <serviceType>{service}</serviceType>
     <serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
     <controlURL>/ctl/IPConn</controlURL>
     <SCPDURL>/WANIPCn.xml</SCPDURL>
    </service></serviceList>
   </device></deviceList>
  </device></deviceList>
 </device>
</root>
"""


def soap_answer(action: str, fields: dict[str, str]) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action}Response xmlns:u="{SERVICE}">{inner}</u:{action}Response>'
        "</s:Body></s:Envelope>"
    ).encode()


def soap_fault(code: int, text: str) -> bytes:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
        "<s:Body><s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring>"
        '<detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
        f"<errorCode>{code}</errorCode><errorDescription>{text}</errorDescription>"
        "</UPnPError></detail></s:Fault></s:Body></s:Envelope>"
    ).encode()


def field(body: str, name: str) -> str:
    match = re.search(rf"<{name}>([^<]*)</{name}>", body)
    return match.group(1).strip() if match else ""


class Gateway:
    def __init__(self, lan_ip: str, wan_ip: str, wan_if: str) -> None:
        self.lan_ip = lan_ip
        self.wan_ip = wan_ip
        self.wan_if = wan_if
        self.mappings: dict[int, tuple[str, int]] = {}
        self.lock = threading.Lock()

    def _rules(self, port: int, client: str, internal: int, op: str) -> list[list[str]]:
        wan = ["-p", "tcp", "-i", self.wan_if]
        dnat = ["-j", "DNAT", "--to-destination", f"{client}:{internal}"]
        accept = ["-d", client, "--dport", str(internal), "-j", "ACCEPT"]
        return [
            ["iptables", "-t", "nat", op, "PREROUTING", *wan, "--dport", str(port), *dnat],
            ["iptables", op, "FORWARD", *wan, *accept],
        ]

    def add(self, port: int, client: str, internal: int) -> None:
        with self.lock:
            self._delete(port)
            for argv in self._rules(port, client, internal, "-I"):
                subprocess.run(argv, check=True, capture_output=True)
            self.mappings[port] = (client, internal)

    def delete(self, port: int) -> bool:
        with self.lock:
            return self._delete(port)

    def _delete(self, port: int) -> bool:
        mapping = self.mappings.pop(port, None)
        if mapping is None:
            return False
        for argv in self._rules(port, *mapping, "-D"):
            subprocess.run(argv, capture_output=True)
        return True


def make_handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: object) -> None:
            sys.stderr.write("igd: " + fmt % args + "\n")

        def _send(self, code: int, body: bytes, kind: str = "text/xml") -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/rootDesc.xml":
                self._send(200, DESCRIPTION.format(device=DEVICE, service=SERVICE).encode())
            else:
                self._send(404, b"")

        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length", "0")), 65536)
            body = self.rfile.read(length).decode("utf-8", "replace")
            action = (self.headers.get("SOAPAction", "").strip('"').rpartition("#")[2]).strip()
            if action == "GetExternalIPAddress":
                self._send(200, soap_answer(action, {"NewExternalIPAddress": gateway.wan_ip}))
            elif action == "AddPortMapping":
                try:
                    port = int(field(body, "NewExternalPort"))
                    internal = int(field(body, "NewInternalPort"))
                    client = field(body, "NewInternalClient")
                    socket.inet_aton(client)
                except (ValueError, OSError):
                    self._send(500, soap_fault(402, "Invalid Args"))
                    return
                if client != self.client_address[0]:
                    self._send(500, soap_fault(718, "ConflictInMappingEntry"))
                    return
                gateway.add(port, client, internal)
                self._send(200, soap_answer(action, {}))
            elif action == "DeletePortMapping":
                try:
                    port = int(field(body, "NewExternalPort"))
                except ValueError:
                    self._send(500, soap_fault(402, "Invalid Args"))
                    return
                if gateway.delete(port):
                    self._send(200, soap_answer(action, {}))
                else:
                    self._send(500, soap_fault(714, "NoSuchEntryInArray"))
            else:
                self._send(500, soap_fault(401, "Invalid Action"))

    return Handler


def ssdp_responder(gateway: Gateway) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("", 1900))
    group = socket.inet_aton("239.255.255.250")
    membership = struct.pack("4s4s", group, socket.inet_aton(gateway.lan_ip))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    location = f"http://{gateway.lan_ip}:{HTTP_PORT}/rootDesc.xml"
    while True:
        data, addr = sock.recvfrom(4096)
        text = data.decode("utf-8", "replace")
        if not text.startswith("M-SEARCH"):
            continue
        lines = text.split("\r\n")
        target = next(
            (x.split(":", 1)[1].strip() for x in lines if x.upper().startswith("ST:")), ""
        )
        if target not in (DEVICE, SERVICE, "ssdp:all", "upnp:rootdevice"):
            continue
        answer = (
            "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
            f"ST: {target}\r\nUSN: uuid:gossamer-lab-igd::{target}\r\n"
            f"LOCATION: {location}\r\nSERVER: gossamer-natlab UPnP/1.1\r\nEXT:\r\n\r\n"
        )
        sock.sendto(answer.encode(), addr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lan-ip", required=True)
    parser.add_argument("--wan-ip", required=True)
    parser.add_argument("--wan-if", default="wan")
    args = parser.parse_args()
    gateway = Gateway(args.lan_ip, args.wan_ip, args.wan_if)
    server = ThreadingHTTPServer((args.lan_ip, HTTP_PORT), make_handler(gateway))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Thread(target=ssdp_responder, args=(gateway,), daemon=True).start()
    print("ready", flush=True)
    sys.stdin.read()
    for port in list(gateway.mappings):
        gateway.delete(port)


if __name__ == "__main__":
    main()
