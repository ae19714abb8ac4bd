#!/usr/bin/env python3
"""A Postfix socketmap client for `make bench-policy`: the same netstring lookups against any socketmap server.

  first  --target NAME=HOST:PORT ... --domain D ...     one lookup per domain on a fresh connection, in order;
                                                        prints one JSON line per lookup (the cold path)
  load   --target NAME=HOST:PORT --domain D ... -n N -c C
                                                        N lookups round-robin over the domains from C processes,
                                                        each on its own persistent connection (as Postfix's smtp
                                                        processes keep theirs); prints one JSON line of figures
  check  --sidecar HOST:PORT --anchor HOST:PORT --domain D ...
                                                        both answers per domain and whether they agree; exits 1 on
                                                        a disagreement
  report FILE                                           the figures table from the JSON lines of first and load

Replies are read whole (netstring framing) before the next request is sent; the map name is `postfix`.
"""
import argparse
import json
import multiprocessing
import socket
import statistics
import subprocess
import sys
import time

MAP_NAME = "postfix"


class Client:
    def __init__(self, address):
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def lookup(self, domain):
        payload = f"{MAP_NAME} {domain}".encode()
        self.sock.sendall(b"%d:%s," % (len(payload), payload))
        return self._reply()

    def _reply(self):
        while True:
            colon = self.buffer.find(b":")
            if colon > 0:
                length = int(self.buffer[:colon])
                end = colon + 1 + length
                if len(self.buffer) > end:
                    if self.buffer[end:end + 1] != b",":
                        raise ValueError(f"reply is not a netstring: {self.buffer[:80]!r}")
                    reply = self.buffer[colon + 1:end].decode()
                    self.buffer = self.buffer[end + 1:]
                    return reply
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"server closed the connection (buffered {self.buffer[:80]!r})")
            self.buffer += chunk

    def close(self):
        self.sock.close()


def target(spec):
    name, _, address = spec.partition("=")
    if not address:
        raise argparse.ArgumentTypeError(f"{spec!r} is not NAME=HOST:PORT")
    return name, address


def percentile(sorted_values, fraction):
    index = min(len(sorted_values) - 1, max(0, int(round(fraction * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


def cmd_first(args):
    for name, address in args.target:
        client = Client(address)
        for domain in args.domain:
            started = time.perf_counter_ns()
            reply = client.lookup(domain)
            elapsed = time.perf_counter_ns() - started
            print(json.dumps({"kind": "first", "target": name, "domain": domain, "us": elapsed / 1000,
                              "reply": reply}), flush=True)
        client.close()


def worker(address, domains, count, offset, barrier, results):
    client = Client(address)
    # One untimed lookup so connection set-up is not part of the figures.
    client.lookup(domains[offset % len(domains)])
    latencies = []
    replies = {}
    barrier.wait()
    started = time.perf_counter()
    for i in range(count):
        domain = domains[(offset + i) % len(domains)]
        t0 = time.perf_counter_ns()
        reply = client.lookup(domain)
        latencies.append(time.perf_counter_ns() - t0)
        replies.setdefault(domain, reply)
    finished = time.perf_counter()
    client.close()
    results.put((started, finished, latencies, replies))


def cmd_load(args):
    name, address = args.target
    per_client = max(1, args.lookups // args.clients)
    barrier = multiprocessing.Barrier(args.clients)
    results = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=worker, args=(address, args.domain, per_client, i, barrier, results))
               for i in range(args.clients)]
    for process in workers:
        process.start()
    gathered = [results.get() for _ in workers]
    for process in workers:
        process.join()
        if process.exitcode != 0:
            sys.exit(f"a client process of {name} failed (exit {process.exitcode})")
    started = min(g[0] for g in gathered)
    finished = max(g[1] for g in gathered)
    latencies = sorted(value for g in gathered for value in g[2])
    replies = {}
    for g in gathered:
        replies.update(g[3])
    print(json.dumps({
        "kind": "load", "target": name, "clients": args.clients, "lookups": len(latencies),
        "seconds": round(finished - started, 3), "per_second": round(len(latencies) / (finished - started), 1),
        "p50_us": round(percentile(latencies, 0.50) / 1000, 1), "p99_us": round(percentile(latencies, 0.99) / 1000, 1),
        "replies": replies,
    }), flush=True)


def parse_policy(reply):
    """`OK level attr=value ...` as (level, {attr: value}); None for anything but OK."""
    if not reply.startswith("OK "):
        return None
    words = reply[3:].split()
    attributes = dict(word.split("=", 1) for word in words[1:] if "=" in word)
    return words[0], attributes


def postfix_match(pattern, host):
    """Postfix's `match=` semantics for one pattern: exact name, or `.suffix` for any name below it."""
    return host == pattern or (pattern.startswith(".") and host.endswith(pattern))


def mx_hosts(domain):
    output = subprocess.run(["dig", "+short", "MX", domain], check=True, capture_output=True, text=True).stdout
    return [line.split()[1].rstrip(".").lower() for line in output.splitlines() if len(line.split()) == 2]


def compare(domain, sidecar, anchor):
    """(agrees, explanation) for one domain's two answers."""
    ours, theirs = parse_policy(sidecar), parse_policy(anchor)
    if ours and theirs:
        same_level = ours[0] == theirs[0]
        same_match = set(ours[1].get("match", "").split(":")) == set(theirs[1].get("match", "").split(":"))
        same_sni = ours[1].get("servername") == theirs[1].get("servername")
        extra = sorted(set(ours[1]) - set(theirs[1]))
        note = f"same policy; the sidecar adds {', '.join(extra)}" if extra else "same policy"
        return same_level and same_match and same_sni, note
    if ours and ours[0] == "dane-only" and anchor == "NOTFOUND ":
        return True, "DANE domain: the sidecar answers dane-only, the resolver knows only MTA-STS"
    if sidecar.startswith("TEMP no secure path") and theirs and theirs[0] == "secure":
        patterns = theirs[1].get("match", "").split(":")
        hosts = mx_hosts(domain)
        usable = [host for host in hosts if any(postfix_match(p, host) for p in patterns)]
        if not usable:
            return True, (f"no MX may be used: the sidecar defers at lookup, the resolver's match={':'.join(patterns)}"
                          f" fits none of the MX hosts {', '.join(hosts)}")
        return False, f"the resolver allows MX {', '.join(usable)} where the sidecar allows none"
    return False, "different answers"


def cmd_check(args):
    sidecar, anchor = Client(args.sidecar), Client(args.anchor)
    failed = False
    for domain in args.domain:
        ours, theirs = sidecar.lookup(domain), anchor.lookup(domain)
        agrees, note = compare(domain, ours, theirs)
        failed |= not agrees
        print(f"{domain}: {'AGREE' if agrees else 'DISAGREE'} ({note})\n"
              f"  sidecar: {ours}\n  anchor:  {theirs}")
    sys.exit(1 if failed else 0)


def cmd_report(args):
    records = [json.loads(line) for line in open(args.file) if line.startswith("{")]
    # A server's first lookup after it started pays its one-time set-up too (the sidecar: the DNSSEC chain from the
    # trust anchor, its HTTPS client); the following domains of the same round are first lookups of a running one.
    # `first` asks every domain in turn, one server after the other: blocks of one lookup per domain.
    cold = [r for r in records if r["kind"] == "first"]
    domains = len({r["domain"] for r in cold}) or 1
    first, later = {}, {}
    for index, record in enumerate(cold):
        (first if index % domains == 0 else later).setdefault(record["target"], []).append(record["us"])
    loads = {}
    for record in (r for r in records if r["kind"] == "load"):
        loads.setdefault(record["clients"], {})[record["target"]] = record
    rows = [("figure", "anchor (postfix-mta-sts-resolver)", "sidecar", "sidecar/anchor")]
    for label, cold in (("cold: first lookup after the server started", first),
                        ("cold: first lookup of another domain, server running", later)):
        if "sidecar" in cold and "anchor" in cold:
            s, a = sorted(cold["sidecar"]), sorted(cold["anchor"])
            rows.append((f"{label}, p50 / max ({len(s)} lookups)",
                         f"{statistics.median(a) / 1000:.1f} / {a[-1] / 1000:.1f} ms",
                         f"{statistics.median(s) / 1000:.1f} / {s[-1] / 1000:.1f} ms",
                         f"{statistics.median(s) / statistics.median(a):.2f} (p50)"))
    for clients in sorted(loads):
        pair = loads[clients]
        if "sidecar" not in pair or "anchor" not in pair:
            continue
        s, a = pair["sidecar"], pair["anchor"]
        rows.append((f"warm, {clients} client(s), {s['lookups']} lookups: lookups/s",
                     f"{a['per_second']:.0f}", f"{s['per_second']:.0f}", f"{s['per_second'] / a['per_second']:.2f}"))
        rows.append((f"warm, {clients} client(s): latency p50 / p99",
                     f"{a['p50_us']:.0f} / {a['p99_us']:.0f} µs", f"{s['p50_us']:.0f} / {s['p99_us']:.0f} µs", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    first = commands.add_parser("first")
    first.add_argument("--target", type=target, action="append", required=True)
    first.add_argument("--domain", action="append", required=True)
    load = commands.add_parser("load")
    load.add_argument("--target", type=target, required=True)
    load.add_argument("--domain", action="append", required=True)
    load.add_argument("-n", "--lookups", type=int, default=20000)
    load.add_argument("-c", "--clients", type=int, default=1)
    check = commands.add_parser("check")
    check.add_argument("--sidecar", required=True)
    check.add_argument("--anchor", required=True)
    check.add_argument("--domain", action="append", required=True)
    report = commands.add_parser("report")
    report.add_argument("file")
    args = parser.parse_args()
    {"first": cmd_first, "load": cmd_load, "check": cmd_check, "report": cmd_report}[args.command](args)


if __name__ == "__main__":
    main()
