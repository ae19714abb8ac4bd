#!/usr/bin/env python3
"""Verifies every DKIM-Signature of the message on stdin with dkimpy, an implementation independent of the
sidecar's. The selector records come from the command line (name=value, as `securemail-operator render` prints
them) instead of DNS: they are the records the tenant is told to publish. Prints one line per signature and exits
non-zero unless there is at least one signature and all verify."""
import sys

import dkim


def main() -> int:
    records = {}
    for arg in sys.argv[1:]:
        name, _, value = arg.partition("=")
        records[name.rstrip(".").lower()] = value.encode()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        return records.get(name.rstrip(".").lower())

    message = sys.stdin.buffer.read()
    verifier = dkim.DKIM(message)
    signatures = [value for header, value in verifier.headers if header.lower() == b"dkim-signature"]
    if not signatures:
        print("no DKIM-Signature header")
        return 1
    ok = True
    for index, _ in enumerate(signatures):
        valid = verifier.verify(idx=index, dnsfunc=dnsfunc)
        tags = dict(
            tag.strip().split("=", 1) for tag in signatures[index].decode().replace("\r\n", "").split(";") if "=" in tag
        )
        print(f"signature {index}: a={tags.get('a', '?').strip()} d={tags.get('d', '?').strip()} "
              f"s={tags.get('s', '?').strip()} {'pass' if valid else 'FAIL'}")
        ok = ok and valid
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
