#!/usr/bin/env python3
"""A STARTTLS-stripping man in the middle for the data-plane tests.

Relays SMTP between a client and an upstream server, deletes STARTTLS from every EHLO reply and refuses a
STARTTLS command itself (so the upstream never starts TLS), and records what the client sent after its EHLO.
A test reads the session log to prove that no message byte crossed the attacker's hands.

Session log: one JSON object per connection in which the client sent anything, written when it ends:
  {"peer": "10.77.0.10:40000", "ehlo": "EHLO mta.sender.test", "bytes_after_ehlo": 6,
   "after_ehlo": "QUIT\\r\\n", "starttls_refused": 0}
Raw bytes after EHLO are also appended to <log>.raw, so binary content is kept exactly.
"""

import argparse
import asyncio
import json
import sys

STARTTLS_REFUSAL = b"454 4.7.0 TLS not available due to local problem\r\n"


def strip_starttls(reply_lines):
    """Removes STARTTLS from one complete multi-line reply and repairs the final-line separator."""
    kept = [line for line in reply_lines if line[4:].strip().upper() != b"STARTTLS"]
    if not kept:
        return reply_lines
    last = kept[-1]
    if len(last) > 3 and last[3:4] == b"-":
        kept[-1] = last[:3] + b" " + last[4:]
    return kept


class Session:
    def __init__(self, args, client_reader, client_writer):
        self.args = args
        self.client_reader = client_reader
        self.client_writer = client_writer
        self.peer = "%s:%s" % client_writer.get_extra_info("peername")[:2]
        self.ehlo = None
        self.after_ehlo = bytearray()
        self.starttls_refused = 0
        self.client_bytes = 0
        # Set when an EHLO went upstream: its reply is the one to strip. STARTTLS may not be pipelined
        # (RFC 3207), so answering it directly cannot overtake an upstream reply.
        self.expecting_ehlo_reply = False

    async def run(self):
        try:
            up_reader, up_writer = await asyncio.open_connection(self.args.upstream_host, self.args.upstream_port)
        except OSError as err:
            print("stripproxy: upstream unreachable: %s" % err, file=sys.stderr, flush=True)
            self.client_writer.close()
            return
        try:
            await asyncio.gather(self.client_to_server(up_writer), self.server_to_client(up_reader))
        finally:
            for writer in (up_writer, self.client_writer):
                writer.close()
            self.write_log()

    async def client_to_server(self, up_writer):
        try:
            while True:
                line = await self.client_reader.readline()
                if not line:
                    break
                self.client_bytes += len(line)
                if self.ehlo is not None:
                    self.after_ehlo += line
                command = line.strip().upper()
                if self.ehlo is None and (command.startswith(b"EHLO") or command.startswith(b"HELO")):
                    self.ehlo = line.decode("latin-1").strip()
                    self.expecting_ehlo_reply = True
                elif command.startswith(b"EHLO"):
                    self.expecting_ehlo_reply = True
                if command == b"STARTTLS":
                    # Never forward it: an upstream that starts TLS would hand the client a secure channel.
                    self.starttls_refused += 1
                    self.client_writer.write(STARTTLS_REFUSAL)
                    await self.client_writer.drain()
                    continue
                up_writer.write(line)
                await up_writer.drain()
        except ConnectionError:
            pass
        finally:
            if up_writer.can_write_eof():
                try:
                    up_writer.write_eof()
                except OSError:
                    pass

    async def server_to_client(self, up_reader):
        reply = []
        try:
            while True:
                line = await up_reader.readline()
                if not line:
                    break
                reply.append(line)
                if len(line) >= 4 and line[3:4] == b"-":
                    continue
                if self.expecting_ehlo_reply and line.startswith(b"250"):
                    reply = strip_starttls(reply)
                    self.expecting_ehlo_reply = False
                self.client_writer.write(b"".join(reply))
                await self.client_writer.drain()
                reply = []
        except ConnectionError:
            pass
        finally:
            try:
                self.client_writer.close()
            except OSError:
                pass

    def write_log(self):
        # A connection that never sent a byte (a port probe, such as up.sh's readiness check) is not a session.
        if self.client_bytes == 0:
            return
        record = {
            "peer": self.peer,
            "ehlo": self.ehlo,
            "bytes_after_ehlo": len(self.after_ehlo),
            "after_ehlo": self.after_ehlo.decode("latin-1"),
            "starttls_refused": self.starttls_refused,
        }
        with open(self.args.log, "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\n")
        with open(self.args.log + ".raw", "ab") as raw:
            raw.write(bytes(self.after_ehlo))


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-host", required=True)
    parser.add_argument("--listen-port", type=int, default=25)
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, default=25)
    parser.add_argument("--log", required=True, help="session log (JSON lines)")
    args = parser.parse_args()
    open(args.log, "a", encoding="utf-8").close()

    async def handle(reader, writer):
        await Session(args, reader, writer).run()

    server = await asyncio.start_server(handle, args.listen_host, args.listen_port)
    print("stripproxy: listening on %s:%d -> %s:%d" % (args.listen_host, args.listen_port, args.upstream_host,
                                                      args.upstream_port), file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
