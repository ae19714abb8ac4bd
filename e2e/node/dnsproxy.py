#!/usr/bin/env python3
"""A DNS forwarder standing for the upstream a cluster's DNS may have, for the node's DNS suite (node_dns.rs).

Modes:
  unvalidated  a resolver that does not validate DNSSEC: every query goes upstream with CD (checking disabled) set,
               so the upstream returns signatures and data without judging them, bogus data included; AD is
               cleared in the answer. A client that validates itself (the sidecar) still gets what it needs.
  strip        a resolver or middlebox that drops DNSSEC: RRSIG, NSEC and NSEC3 records are removed from every
               section, and AD and the OPT record's DO flag are cleared.

Listens on UDP and TCP; asks upstream over TCP, so no answer is ever truncated on the way in. A UDP answer larger
than the client accepts goes back empty with TC set, as a resolver does, and the client retries over TCP.
"""

import argparse
import socket
import socketserver
import struct
import sys
import threading

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype

DNSSEC_TYPES = {dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3}


def answer(args, wire):
    """The answer to one query in wire format, as this mode's upstream gives it."""
    query = dns.message.from_wire(wire)
    upstream_query = dns.message.from_wire(wire)
    upstream_query.flags |= dns.flags.CD if args.mode == "unvalidated" else 0
    response = dns.query.tcp(upstream_query, args.upstream_host, port=args.upstream_port, timeout=5)
    response.id = query.id
    response.flags &= ~dns.flags.AD
    if args.mode == "unvalidated":
        # The client's own CD bit is echoed, not the one added here.
        response.flags = (response.flags & ~dns.flags.CD) | (query.flags & dns.flags.CD)
    if args.mode == "strip":
        for section in (response.answer, response.authority, response.additional):
            section[:] = [rrset for rrset in section if rrset.rdtype not in DNSSEC_TYPES]
        response.ednsflags &= ~dns.flags.DO
    return response


class UdpHandler(socketserver.BaseRequestHandler):
    def handle(self):
        wire, sock = self.request
        try:
            query = dns.message.from_wire(wire)
            response = answer(self.server.args, wire)
            limit = query.payload if query.edns >= 0 else 512
            try:
                out = response.to_wire(max_size=limit)
            except dns.exception.TooBig:
                truncated = dns.message.make_response(query)
                truncated.flags |= dns.flags.TC
                out = truncated.to_wire()
            sock.sendto(out, self.client_address)
        except Exception as error:  # one bad query must not stop the proxy
            print("dnsproxy: udp %s: %s" % (self.client_address[0], error), file=sys.stderr, flush=True)


class TcpHandler(socketserver.BaseRequestHandler):
    def handle(self):
        conn = self.request
        try:
            while True:
                head = conn.recv(2, socket.MSG_WAITALL)
                if len(head) < 2:
                    return
                (length,) = struct.unpack("!H", head)
                wire = conn.recv(length, socket.MSG_WAITALL)
                out = answer(self.server.args, wire).to_wire()
                conn.sendall(struct.pack("!H", len(out)) + out)
        except Exception as error:
            print("dnsproxy: tcp %s: %s" % (self.client_address[0], error), file=sys.stderr, flush=True)


class Udp(socketserver.ThreadingMixIn, socketserver.UDPServer):
    allow_reuse_address = True
    daemon_threads = True


class Tcp(socketserver.ThreadingMixIn, socketserver.TCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", required=True)
    parser.add_argument("--listen-port", type=int, default=53)
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, default=53)
    parser.add_argument("--mode", choices=["unvalidated", "strip"], required=True)
    args = parser.parse_args()
    servers = [Udp((args.listen_host, args.listen_port), UdpHandler), Tcp((args.listen_host, args.listen_port), TcpHandler)]
    for server in servers:
        server.args = args
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("dnsproxy: %s on %s:%d -> %s:%d" % (args.mode, args.listen_host, args.listen_port, args.upstream_host,
                                                 args.upstream_port), file=sys.stderr, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
