#!/usr/bin/env python3
"""Submits one message (read from stdin) on the submission port the way a tenant application does, and prints a
JSON report of how far it got: {"stage": ..., "code": ..., "text": ..., "refused": {...}}. `stage` is "sent" when
Postfix accepted the message, otherwise the step that failed (connect, starttls, mail, rcpt, data)."""
import argparse
import json
import smtplib
import ssl
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=587)
    parser.add_argument("--from", dest="sender", required=True)
    parser.add_argument("--to", action="append", required=True)
    parser.add_argument("--ca", required=True, help="CA that signed the submission server certificate")
    parser.add_argument("--cert", help="client certificate; without one the server must refuse")
    parser.add_argument("--key")
    parser.add_argument("--no-tls", action="store_true", help="try MAIL FROM without STARTTLS")
    parser.add_argument("--source", help="connect from this local address, as an application pod would from its own")
    parser.add_argument("--helo", default="app.test", help="the name to say EHLO with")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send stdin after DATA byte for byte, including its end marker (smtplib would normalise line ends)",
    )
    args = parser.parse_args()
    message = sys.stdin.buffer.read()

    report = {"stage": "connect"}
    try:
        source = (args.source, 0) if args.source else None
        with smtplib.SMTP(args.host, args.port, local_hostname=args.helo, timeout=60, source_address=source) as smtp:
            smtp.ehlo()
            if not args.no_tls:
                report["stage"] = "starttls"
                context = ssl.create_default_context(cafile=args.ca)
                context.check_hostname = False
                if args.cert:
                    context.load_cert_chain(args.cert, args.key)
                smtp.starttls(context=context)
                smtp.ehlo()
            report["stage"] = "mail"
            code, text = smtp.mail(args.sender)
            if code != 250:
                report.update(code=code, text=text.decode(errors="replace"))
                return print_report(report)
            report["stage"] = "rcpt"
            refused = {}
            for recipient in args.to:
                code, text = smtp.rcpt(recipient)
                if code not in (250, 251):
                    refused[recipient] = [code, text.decode(errors="replace")]
            report["refused"] = refused
            if len(refused) == len(args.to):
                return print_report(report)
            report["stage"] = "data"
            if args.raw:
                code, text = smtp.docmd("DATA")
                if code != 354:
                    report.update(code=code, text=text.decode(errors="replace"))
                    return print_report(report)
                smtp.send(message)
                code, text = smtp.getreply()
            else:
                code, text = smtp.data(message)
            report.update(code=code, text=text.decode(errors="replace"))
            if code == 250:
                report["stage"] = "sent"
    except (OSError, smtplib.SMTPException, ssl.SSLError) as err:
        report["error"] = f"{type(err).__name__}: {err}"
        if isinstance(err, smtplib.SMTPResponseException):
            report.update(code=err.smtp_code, text=err.smtp_error.decode(errors="replace"))
    return print_report(report)


def print_report(report: dict) -> int:
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
