#!/usr/bin/env python3
"""Benchmark submitter: sends COUNT messages of about SIZE bytes on the submission port the way a tenant application
does (STARTTLS, client certificate), over CONNECTIONS parallel sessions with many messages each. Every message
carries `Message-ID: <TAG.N@sender.test>` and `X-Bench-Submitted: <unix time>` (taken just before its DATA), so
arrival latency can be read from the receiver's Maildir. Every message goes to --to, or with --recipients FILE
message N goes to line N of FILE (one address a line, at least COUNT lines). Prints one JSON object: start and end (unix time), sent,
errors. Exits non-zero when any message was refused.

With --keep-going (fault injection: Postfix may be killed at any moment) every number is tried once: a message that
fails or is refused is counted in "failed" and the session is opened again, retrying the connection until
--connect-timeout; --accepted FILE gets the number of each message answered 250, one per line, as it happens."""
import argparse
import json
import smtplib
import ssl
import sys
import threading
import time


def body(size: int) -> str:
    line = "Your lab results are ready; sign in to the patient portal to read them. 0123456789\r\n"
    return line * max(1, size // len(line))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--from", dest="sender", required=True)
    to = parser.add_mutually_exclusive_group(required=True)
    to.add_argument("--to")
    to.add_argument("--recipients", help="file whose line N is the recipient of message N")
    parser.add_argument("--ca", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--size", type=int, default=10240)
    parser.add_argument("--tag", required=True)
    parser.add_argument("--keep-going", action="store_true")
    parser.add_argument("--connect-timeout", type=float, default=300)
    parser.add_argument("--accepted", help="file to append the number of each accepted message to")
    args = parser.parse_args()

    text = body(args.size)
    if args.recipients:
        with open(args.recipients, encoding="ascii") as lines:
            recipients = [line.strip() for line in lines if line.strip()]
        if len(recipients) < args.count:
            parser.error(f"{args.recipients} has {len(recipients)} recipients, fewer than --count {args.count}")
    else:
        recipients = [args.to]
    context = ssl.create_default_context(cafile=args.ca)
    context.check_hostname = False
    context.load_cert_chain(args.cert, args.key)
    errors: list[str] = []
    sent = [0]
    failed = [0]
    lock = threading.Lock()
    accepted = open(args.accepted, "a", encoding="ascii") if args.accepted else None

    def recipient(n: int) -> str:
        return recipients[n] if args.recipients else args.to

    def message(n: int) -> str:
        return (
            f"From: Lakeside Alerts <{args.sender}>\r\nTo: <{recipient(n)}>\r\n"
            f"Subject: Benchmark {args.tag} {n}\r\nMessage-ID: <{args.tag}.{n}@sender.test>\r\n"
            f"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\nX-Bench-Submitted: {time.time():.6f}\r\n"
            f"\r\n{text}"
        )

    def connect() -> smtplib.SMTP:
        deadline = time.time() + args.connect_timeout
        while True:
            try:
                smtp = smtplib.SMTP(args.host, args.port, local_hostname="app.test", timeout=120)
                try:
                    smtp.ehlo()
                    smtp.starttls(context=context)
                    smtp.ehlo()
                except BaseException:
                    smtp.close()
                    raise
                return smtp
            except (OSError, smtplib.SMTPException, ssl.SSLError):
                if not args.keep_going or time.time() > deadline:
                    raise
                time.sleep(0.2)

    def worker(first: int, step: int) -> None:
        smtp = None
        try:
            for n in range(first, args.count, step):
                try:
                    if smtp is None:
                        smtp = connect()
                    refused = smtp.sendmail(args.sender, [recipient(n)], message(n).encode())
                    if refused:
                        raise smtplib.SMTPException(f"refused: {refused}")
                except (OSError, smtplib.SMTPException, ssl.SSLError) as err:
                    if not args.keep_going:
                        raise
                    with lock:
                        failed[0] += 1
                    if smtp is not None:
                        smtp.close()
                        smtp = None
                    continue
                with lock:
                    sent[0] += 1
                    if accepted:
                        accepted.write(f"{n}\n")
                        accepted.flush()
            if smtp is not None:
                smtp.quit()
        except (OSError, smtplib.SMTPException, ssl.SSLError) as err:
            with lock:
                errors.append(f"{type(err).__name__}: {err}")

    start = time.time()
    threads = [threading.Thread(target=worker, args=(i, args.connections)) for i in range(args.connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    end = time.time()
    print(json.dumps({"start": start, "end": end, "sent": sent[0], "failed": failed[0], "errors": errors}))
    if args.keep_going:
        return 0 if sent[0] > 0 and not errors else 1
    return 0 if sent[0] == args.count and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
