#!/usr/bin/env bash
# Builds the three images of SecureMail from this checkout as OCI archives, with no container engine and no
# registry: IMAGE.tar (an OCI image layout with the image and its SBOM attached as a referring artifact) and
# IMAGE.spdx.json in OUT_DIR (default: target/images). Prints one line per image: reference, manifest digest,
# compressed and unpacked size. docs/images.md describes the images and why they are built this way.
#
#   operator, sidecar: the release binary (cargo auditable: the crate list is in the binary), the shared libraries
#                      its ELF header names, taken from Debian's packages, the CA bundle, passwd/group; no shell.
#   mta:               Debian's Postfix and its run-time dependencies (images/debian/mta.txt) without docs, plus
#                      the start-up script images/mta/start.
#
# Usage: images/build.sh [OUT_DIR [IMAGE...]] (IMAGE: operator, sidecar, mta; default all three). An image whose
# inputs did not change since the last build is not rebuilt.
set -euo pipefail
umask 022
export LC_ALL=C

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=$(mkdir -p "${1:-$root/target/images}" && cd "${1:-$root/target/images}" && pwd)
images=("${@:2}")
[ ${#images[@]} -gt 0 ] || images=(operator sidecar mta)
cache=${SECUREMAIL_CACHE:-$HOME/.cache/securemail}
debs=$cache/debs
work=$out/.work
# Numeric user of the operator and sidecar, and the uid of Postfix's mail_owner in the mta image: the Helm chart and
# the StatefulSet (operator/src/build/statefulset.rs, SIDECAR_UID) run them as this uid.
app_uid=65532
registry=ghcr.io/securemail
# The images are for amd64 (what Debian calls the architecture, and its library directory).
multiarch=x86_64-linux-gnu

die() { echo "images/build.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root: the root file systems carry files owned by other users"
for tool in git python3 apt-get dpkg-deb readelf; do
  command -v "$tool" >/dev/null || die "$tool is not installed (images/install-deps.sh build installs it)"
done

# Everything that ends up in an image is a function of the commit: its time stamps are the commit's time. Both can
# be given (SOURCE_DATE_EPOCH, SECUREMAIL_IMAGE_REVISION), so builds compared with each other (images/check.sh) say
# the same commit even when a commit lands between them.
epoch=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct)}
revision=${SECUREMAIL_IMAGE_REVISION:-$(git -C "$root" rev-parse HEAD)}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$root/Cargo.toml")
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
source_url=$(sed -n '/^\[workspace.package\]/,/^\[/s/^repository = "\(.*\)"/\1/p' "$root/Cargo.toml")
license=$(sed -n '/^\[workspace.package\]/,/^\[/s/^license = "\(.*\)"/\1/p' "$root/Cargo.toml")
[ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ] ||
  echo "images/build.sh: the checkout has uncommitted changes; the images say revision $revision anyway" >&2

# --- Binaries ----------------------------------------------------------------------------------------------------
# The release binaries (images/binaries.sh), for the operator and sidecar images.
bin_dir=
if [[ " ${images[*]} " == *" operator "* || " ${images[*]} " == *" sidecar "* ]]; then
  bin_dir=$("$here/binaries.sh")
fi

# --- Debian packages ---------------------------------------------------------------------------------------------
# Downloaded once by apt (which checks them against the signed archive), kept outside the repository by file name.
mkdir -p "$debs"
deb_file() { # NAME=VERSION -> path of the downloaded .deb
  local name=${1%%=*} version=${1#*=}
  local pattern="$debs/${name}_${version//:/%3a}_"
  local found=("$pattern"*.deb)
  [ -f "${found[0]}" ] && { echo "${found[0]}"; return; }
  return 1
}
fetch_debs() { # LIST_FILE
  local missing=() package
  while read -r package; do
    deb_file "$package" >/dev/null || missing+=("$package")
  done < <(grep -v '^#' "$1")
  [ ${#missing[@]} -eq 0 ] && return
  echo "images/build.sh: downloading ${missing[*]}" >&2
  (cd "$debs" && apt-get download -q "${missing[@]}" >/dev/null 2>&1) || {
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$debs" && apt-get download -q "${missing[@]}" >/dev/null) ||
      die "could not download ${missing[*]}; a pinned version left the Debian archive? Run images/lock-packages.sh"
  }
}
fetch_debs "$here/debian/base.txt"
fetch_debs "$here/debian/mta.txt"
packages() { grep -v '^#' "$here/debian/$1.txt"; }

# A package's files without documentation, manual pages, translations and bug-tool hooks. Copyright files stay:
# they are the packages' licenses.
extract_deb() { # DEB DIR
  dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --same-permissions --same-owner \
    --exclude='./usr/share/man/*' --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' \
    --exclude='./usr/share/lintian/*' --exclude='./usr/share/bug/*' --exclude='./usr/share/doc-base/*'
  if [ -d "$2/usr/share/doc" ]; then
    find "$2/usr/share/doc" -type f ! -name copyright -delete
    find "$2/usr/share/doc" -depth -type d -empty -delete
  fi
}

# dpkg's record of the packages an image holds, for the SBOM tool and scanners: one file per package under
# /var/lib/dpkg/status.d (the layout of distroless images, whose files only partly come from their packages) or
# a single /var/lib/dpkg/status.
dpkg_stanza() { # DEB
  dpkg-deb -f "$1" | grep -v '^Description\|^ ' | sed '/^Package:/a Status: install ok installed'
}

inputs_hash() { # FILES... -> one hash over the names and contents of every input of an image
  {
    printf '%s\n' "$epoch" "$revision" "$version"
    sha256sum "$@" "$here/build.sh" "$here/oci.py" "$here/sbom.sh" "$here/tools.sh"
  } | sha256sum | cut -d' ' -f1
}

passwd_files() { # ROOTFS [EXTRA_PASSWD_LINES]
  mkdir -p "$1/etc"
  {
    echo "root:x:0:0:root:/root:/bin/false"
    printf '%s\n' "${@:2}"
    echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false"
  } >"$1/etc/passwd"
}

# Files of `packages` from the base list that the ELF files below need, found from their DT_NEEDED entries and
# looked up in the unpacked packages, plus the program interpreter.
copy_needed_libraries() { # STAGING ROOTFS ELF...
  local staging=$1 rootfs=$2 todo=("${@:3}") seen=" " elf lib path interpreter
  interpreter=$(readelf -l "${todo[0]}" | sed -n 's/.*Requesting program interpreter: \(.*\)]/\1/p')
  [ -n "$interpreter" ] || die "${todo[0]}: no program interpreter; expected a dynamically linked binary"
  # Where Debian has it: the file in the library directory, the path the ELF header names a link to it.
  install -D -m 0755 "$(library_file "$staging" "${interpreter##*/}")" "$rootfs/lib/$multiarch/${interpreter##*/}"
  mkdir -p "$rootfs${interpreter%/*}"
  ln -s "/lib/$multiarch/${interpreter##*/}" "$rootfs$interpreter"
  seen+="${interpreter##*/} "
  while [ ${#todo[@]} -gt 0 ]; do
    elf=${todo[0]}; todo=("${todo[@]:1}")
    for lib in $(readelf -d "$elf" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [[ $seen == *" $lib "* ]] && continue
      seen+="$lib "
      path=$(library_file "$staging" "$lib")
      install -D -m 0755 "$path" "$rootfs/lib/$multiarch/$lib"
      todo+=("$path")
    done
  done
}

# The regular file named NAME in the unpacked packages (bookworm ships these libraries as files, not links).
library_file() { # STAGING NAME
  local path
  path=$(find "$1/lib" "$1/usr/lib" -name "$2" -type f 2>/dev/null | sort | head -n 1)
  [ -n "$path" ] || die "a binary needs $2, which no package of images/debian/base.txt ships as a file"
  echo "$path"
}

build_app_image() { # NAME BINARY
  local name=$1 binary=$2
  local ref=$registry/$name:$version
  local stamp=$out/$name.inputs hash
  hash=$(inputs_hash "$bin_dir/$binary" "$here/debian/base.txt")
  if [ -f "$out/$name.tar" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    report "$name" "$ref" unchanged
    return
  fi
  local staging=$work/$name/staging rootfs=$work/$name/rootfs package deb
  rm -rf "${work:?}/$name"; mkdir -p "$staging" "$rootfs"
  mkdir -p "$rootfs/var/lib/dpkg/status.d"
  for package in $(packages base); do
    deb=$(deb_file "$package")
    extract_deb "$deb" "$staging"
    dpkg_stanza "$deb" >"$rootfs/var/lib/dpkg/status.d/${package%%=*}"
  done
  install -D -m 0755 "$bin_dir/$binary" "$rootfs/usr/local/bin/$binary"
  copy_needed_libraries "$staging" "$rootfs" "$rootfs/usr/local/bin/$binary"
  # What update-ca-certificates would make of Debian's default selection: every Mozilla root, in name order.
  mkdir -p "$rootfs/etc/ssl/certs"
  cat "$staging"/usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
  install -D -m 0644 "$staging/usr/lib/os-release" "$rootfs/usr/lib/os-release"
  ln -s ../usr/lib/os-release "$rootfs/etc/os-release"
  for package in $(packages base); do
    package=${package%%=*}
    [ -f "$staging/usr/share/doc/$package/copyright" ] &&
      install -D -m 0644 "$staging/usr/share/doc/$package/copyright" "$rootfs/usr/share/doc/$package/copyright"
  done
  passwd_files "$rootfs" "securemail:x:$app_uid:$app_uid:securemail:/nonexistent:/bin/false"
  printf 'root:x:0:\nsecuremail:x:%s:\nnogroup:x:65534:\n' "$app_uid" >"$rootfs/etc/group"
  local config
  config=$(image_config "$name" "$app_uid:$app_uid" "[\"/usr/local/bin/$binary\"]")
  write_image "$name" "$ref" "$rootfs" "$config" "$hash" "$stamp"
}

build_mta_image() {
  local name=mta ref=$registry/mta-postfix:$version
  local stamp=$out/$name.inputs hash
  hash=$(inputs_hash "$here/debian/mta.txt" "$here/mta/start" "$here/mta/ready")
  if [ -f "$out/$name.tar" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$hash" ]; then
    report "$name" "$ref" unchanged
    return
  fi
  local rootfs=$work/$name/rootfs package deb
  rm -rf "${work:?}/$name"; mkdir -p "$rootfs/var/lib/dpkg"
  for package in $(packages mta); do
    deb=$(deb_file "$package")
    extract_deb "$deb" "$rootfs"
    dpkg_stanza "$deb"
    echo
  done >"$rootfs/var/lib/dpkg/status"
  # Of coreutils, only the programs Postfix's scripts and the start-up call; the rest is most of the package's size.
  local keep=" basename cat chgrp chmod chown cp dirname false id ln ls mkdir mv readlink rm sleep sort touch tr true
    uname "
  for path in $(dpkg-deb -c "$(deb_file "$(packages mta | grep '^coreutils=')")" | awk '{print $6}' |
    grep -E '^\./(usr/)?s?bin/.'); do
    [[ $keep == *" $(basename "$path") "* ]] || rm -f "$rootfs/${path#./}"
  done
  # Character set conversion modules: Postfix converts with ICU, never with iconv.
  rm -rf "$rootfs/usr/lib/$multiarch/gconv"
  # Not the mail system of this image: sendmail(1) is refused anyway (authorized_submit_users is empty), and a
  # second copy would make `postfix check` compare them with cmp, which the image does not have.
  rm -f "$rootfs/usr/lib/sendmail"
  # Postfix's users: mail_owner has the sidecar's uid, so the sidecar can count the queue's 0700 directories.
  passwd_files "$rootfs" "postfix:x:$app_uid:$app_uid:Postfix:/var/spool/postfix:/bin/false"
  printf 'root:x:0:\npostfix:x:%s:\npostdrop:x:%s:\nnogroup:x:65534:\n' "$app_uid" "$((app_uid + 1))" \
    >"$rootfs/etc/group"
  # What Debian's maintainer scripts would have done: setgid postdrop programs, the dynamic map table (no map
  # plugins are installed, so only its comments), an empty aliases source.
  # (Numeric: a name would be looked up in the build machine's group file, not the image's.)
  chgrp "$((app_uid + 1))" "$rootfs/usr/sbin/postdrop" "$rootfs/usr/sbin/postqueue"
  chmod 02555 "$rootfs/usr/sbin/postdrop" "$rootfs/usr/sbin/postqueue"
  grep '^#' "$rootfs/usr/share/postfix/dynamicmaps.cf" >"$rootfs/etc/postfix/dynamicmaps.cf"
  # Mount points of the StatefulSet, present so a read-only root needs no directory created at start.
  mkdir -p "$rootfs/var/spool/postfix" "$rootfs/var/lib/postfix" "$rootfs/run/securemail" \
    "$rootfs/etc/securemail/submission-tls" "$rootfs/etc/securemail/client-ca"
  install -D -m 0755 "$here/mta/start" "$rootfs/usr/local/sbin/securemail-mta-start"
  install -D -m 0755 "$here/mta/ready" "$rootfs/usr/local/sbin/securemail-mta-ready"
  check_libraries "$rootfs"
  local config
  config=$(image_config "$name" "0:0" '["/usr/local/sbin/securemail-mta-start"]')
  write_image "$name" "$ref" "$rootfs" "$config" "$hash" "$stamp"
}

# Every shared library an ELF file of the image names is in the image: the package list is complete.
check_libraries() { # ROOTFS
  local rootfs=$1 elf lib absent=""
  while IFS= read -r elf; do
    for lib in $(readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      [ -e "$rootfs/lib/$multiarch/$lib" ] || [ -e "$rootfs/usr/lib/$multiarch/$lib" ] ||
        [ -e "$rootfs/usr/lib/postfix/$lib" ] || absent+=" ${elf#"$rootfs"}:$lib"
    done
  done < <(find "$rootfs" -type f -perm -0100 -exec sh -c 'head -c 4 "$1" | grep -q ELF' _ {} \; -print)
  [ -z "$absent" ] || die "libraries missing from the mta image:$absent"
}

image_config() { # NAME USER ENTRYPOINT_JSON
  python3 - "$@" "$epoch" <<'PY'
import json, sys, datetime
name, user, entrypoint, epoch = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
created = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
print(json.dumps({
    "architecture": "amd64", "os": "linux", "created": created,
    "config": {"User": user, "Entrypoint": entrypoint, "WorkingDir": "/",
               "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
    "history": [{"created": created, "created_by": f"images/build.sh ({name})"}],
}))
PY
}

write_image() { # NAME REF ROOTFS CONFIG HASH STAMP
  local name=$1 ref=$2 rootfs=$3 config=$4 hash=$5 stamp=$6 annotations result
  annotations=$(python3 -c 'import json, sys; print(json.dumps(dict(zip(sys.argv[1::2], sys.argv[2::2]))))' \
    org.opencontainers.image.source "$source_url" \
    org.opencontainers.image.revision "$revision" \
    org.opencontainers.image.version "$version" \
    org.opencontainers.image.licenses "$license" \
    org.opencontainers.image.title "$(basename "${ref%:*}")" \
    org.opencontainers.image.ref.name "$version" \
    org.opencontainers.image.created "$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)")
  rm -f "$stamp"
  result=$(python3 "$here/oci.py" image --rootfs "$rootfs" --config "$config" --annotations "$annotations" \
    --ref "$ref" --epoch "$epoch" --out "$out/$name.tar")
  "$here/sbom.sh" "$out/$name.tar" "$ref" "$out/$name.spdx.json" "$epoch"
  python3 "$here/oci.py" attach-sbom --archive "$out/$name.tar" --sbom "$out/$name.spdx.json" \
    --media-type application/spdx+json --epoch "$epoch"
  echo "$result" >"$out/$name.digest"
  echo "$hash" >"$stamp"
  rm -rf "${work:?}/$name"
  report "$name" "$ref" built
}

report() { # NAME REF HOW
  local digest compressed unpacked
  read -r digest compressed unpacked <"$out/$1.digest"
  awk -v ref="$2" -v digest="$digest" -v c="$compressed" -v u="$unpacked" -v how="$3" 'BEGIN {
    printf "%-40s %s  %5.1f MiB compressed  %5.1f MiB unpacked  (%s)\n", ref, digest, c / 1048576, u / 1048576, how
  }'
}

for image in "${images[@]}"; do
  case $image in
    operator) build_app_image operator securemail-operator ;;
    sidecar) build_app_image sidecar securemail-sidecar ;;
    mta) build_mta_image ;;
    *) die "no image $image; the images are operator, sidecar and mta" ;;
  esac
done
rmdir "$work" 2>/dev/null || true
