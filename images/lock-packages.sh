#!/usr/bin/env bash
# Refreshes the pinned Debian package lists of the images (images/debian/*.txt) from the apt lists of this machine
# (Debian bookworm): base.txt keeps its package names with today's versions; mta.txt is resolved again, the closure
# of the Depends and Pre-Depends of its roots, without the packaging tools the image does without. Run it when a
# pinned version has left the archive (images/build.sh says so), then review and commit the diff.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# What the mta image is for, and what its packages' maintainer scripts use that the image does without (its users,
# files and permissions come from images/build.sh instead).
mta_roots="postfix dash coreutils findutils sed grep mawk netbase base-files"
mta_without="debconf debconf-2.0 adduser dpkg ssl-cert cpio e2fsprogs init-system-helpers perl-base"

[ "$(. /etc/os-release && echo "$VERSION_CODENAME")" = bookworm ] || {
  echo "images/lock-packages.sh: the images are Debian bookworm's; run this on bookworm" >&2
  exit 1
}
apt-get update -qq >/dev/null

python3 - "$here/debian" "$mta_roots" "$mta_without" <<'PY'
import re, subprocess, sys
lists, roots, without = sys.argv[1], sys.argv[2].split(), set(sys.argv[3].split())

def depends(package):
    """First alternative of each Depends and Pre-Depends of the candidate version."""
    out = subprocess.run(["apt-cache", "depends", "--important", package], capture_output=True, text=True,
                         check=True).stdout
    names, take_next = [], True
    for line in out.splitlines()[1:]:
        text = line.strip()
        alternative = text.startswith("|")
        text = text.lstrip("|")
        kind, _, name = text.partition(":")
        if kind in ("Depends", "PreDepends") and not name.strip().startswith("<"):
            if take_next:
                names.append(name.strip().split(":")[0])
            take_next = not alternative
    return names

def candidate(package):
    out = subprocess.run(["apt-cache", "policy", package], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Candidate: (\S+)", out)
    if not match or match.group(1) == "(none)":
        sys.exit(f"lock-packages: no candidate version of {package}")
    return match.group(1)

def rewrite(path, names):
    with open(path) as f:
        header = [line for line in f if line.startswith("#")]
    with open(path, "w") as f:
        f.writelines(header)
        f.writelines(f"{name}={candidate(name)}\n" for name in sorted(names))

closure, todo = set(), list(roots)
while todo:
    package = todo.pop()
    if package in closure or package in without:
        continue
    closure.add(package)
    todo.extend(depends(package))
rewrite(f"{lists}/mta.txt", closure)
with open(f"{lists}/base.txt") as f:
    base = [line.split("=")[0] for line in f if line.strip() and not line.startswith("#")]
rewrite(f"{lists}/base.txt", base)
PY
git -C "$here" diff --stat -- debian
