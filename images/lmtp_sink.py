#!/usr/bin/env python3
"""A minimal LMTP server on a Unix socket standing in for the sidecar in images/containers.sh: it accepts every
recipient and writes each message it takes to DIR/<n>.eml, so the test can count deliveries.

  lmtp_sink.py SOCKET DIR
"""

import os
import socketserver
import sys


class Session(socketserver.StreamRequestHandler):
    def reply(self, line):
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        self.reply("220 sink LMTP")
        recipients = 0
        while line := self.rfile.readline():
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"LHLO":
                self.reply("250 sink")
            elif verb == b"MAIL":
                recipients = 0
                self.reply("250 2.1.0 ok")
            elif verb == b"RCPT":
                recipients += 1
                self.reply("250 2.1.5 ok")
            elif verb == b"DATA":
                self.reply("354 go ahead")
                message = []
                while (data := self.rfile.readline()) not in (b".\r\n", b""):
                    message.append(data[1:] if data.startswith(b"..") else data)
                count = len(os.listdir(self.server.spool))
                with open(os.path.join(self.server.spool, f"{count}.eml"), "wb") as out:
                    out.writelines(message)
                # LMTP: one reply per accepted recipient.
                for _ in range(recipients):
                    self.reply("250 2.0.0 delivered")
            elif verb in (b"RSET", b"NOOP"):
                self.reply("250 2.0.0 ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.2 not implemented")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    path, spool = sys.argv[1], sys.argv[2]
    os.makedirs(spool, exist_ok=True)
    if os.path.exists(path):
        os.remove(path)
    server = Server(path, Session)
    server.spool = spool
    # Postfix's LMTP client connects as mail_owner, not as root.
    os.chmod(path, 0o777)
    server.serve_forever()


if __name__ == "__main__":
    main()
