#!/usr/bin/env python3
"""Opens one TCP connection through a SOCKS5 proxy (no authentication, CONNECT to an IPv4 address), reads the
target's first line (an SMTP banner), sends QUIT and prints what the proxy and the target said, one KEY=value a line:

  bnd_addr=10.77.0.61     the BND.ADDR of the proxy's CONNECT reply: the source address of its outgoing connection
  bnd_port=40123
  banner=220 mx.good.plain.test ESMTP good

Exits 1 with a message on stderr when the proxy refuses (naming the SOCKS5 reply code) or a peer misbehaves.
--command bind or udp-associate sends that request instead of CONNECT, to prove the proxy refuses it.
Standard library only, so it runs anywhere the world's python3 does.
"""

import argparse
import ipaddress
import socket
import struct
import sys

COMMANDS = {"connect": 1, "bind": 2, "udp-associate": 3}
REPLIES = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}


def read_exact(sock, n, what):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SystemExit("socks5_probe: connection closed while reading %s" % what)
        data += chunk
    return data


def host_port(text):
    host, _, port = text.rpartition(":")
    return str(ipaddress.IPv4Address(host)), int(port)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", required=True, type=host_port, help="ADDR:PORT of the SOCKS5 server")
    parser.add_argument("--target", required=True, type=host_port, help="IPv4 ADDR:PORT to CONNECT to")
    parser.add_argument("--command", choices=sorted(COMMANDS), default="connect")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    with socket.create_connection(args.proxy, timeout=args.timeout) as sock:
        sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        version, method = read_exact(sock, 2, "the method selection")
        if version != 5 or method != 0:
            raise SystemExit("socks5_probe: proxy chose method %d (version %d), not 0 (no authentication)"
                             % (method, version))
        target_addr, target_port = args.target
        request = struct.pack("!BBBB", 5, COMMANDS[args.command], 0, 1)
        sock.sendall(request + socket.inet_aton(target_addr) + struct.pack("!H", target_port))
        version, reply, _, atyp = read_exact(sock, 4, "the reply")
        if version != 5:
            raise SystemExit("socks5_probe: reply has version %d" % version)
        if reply != 0:
            raise SystemExit("socks5_probe: proxy refused %s to %s:%d: reply %d (%s)"
                             % (args.command, target_addr, target_port, reply, REPLIES.get(reply, "unknown")))
        if args.command != "connect":
            raise SystemExit("socks5_probe: proxy accepted %s" % args.command)
        if atyp == 1:
            bnd_addr = socket.inet_ntop(socket.AF_INET, read_exact(sock, 4, "BND.ADDR"))
        elif atyp == 4:
            bnd_addr = socket.inet_ntop(socket.AF_INET6, read_exact(sock, 16, "BND.ADDR"))
        elif atyp == 3:
            length = read_exact(sock, 1, "BND.ADDR length")[0]
            bnd_addr = read_exact(sock, length, "BND.ADDR").decode("ascii", "replace")
        else:
            raise SystemExit("socks5_probe: CONNECT reply has address type %d" % atyp)
        (bnd_port,) = struct.unpack("!H", read_exact(sock, 2, "BND.PORT"))

        banner = b""
        while not banner.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            banner += chunk
        if not banner:
            raise SystemExit("socks5_probe: the target sent nothing through the proxy")
        sock.sendall(b"QUIT\r\n")

    print("bnd_addr=%s" % bnd_addr)
    print("bnd_port=%d" % bnd_port)
    print("banner=%s" % banner.decode("utf-8", "replace").rstrip("\r\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
