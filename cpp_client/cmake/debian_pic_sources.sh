#!/usr/bin/env bash
# The Debian sources of abseil, protobuf and re2, at exactly the versions whose -dev packages
# are installed, unpacked with Debian's patches into DEST/{abseil,protobuf,re2}.
#
#   cpp_client/cmake/debian_pic_sources.sh DEST
#
# Why: the self-contained build (NPCD_CLIENT_SELF_CONTAINED, CMakeLists.txt) links grpc++,
# protobuf, abseil and re2 from Debian's static archives into libnpcd_client.so. Debian
# compiles those archives as position-independent *executable* code: a few members use
# local-exec thread-locals or reach libc's `stderr` directly, which a shared library cannot
# hold ("relocation R_X86_64_TPOFF32 ... can not be used when making a shared object").
# CMakeLists.txt recompiles just those members (NPCD_PIC_MEMBERS) from these sources with
# -fPIC; everything else comes from the archives as shipped.
#
# Needs `deb-src` entries in the apt sources (apt-get update after adding them) and
# dpkg-source; sources are cached per version under ${NPCD_CACHE:-~/.cache/npcd}/debian-src.
set -euo pipefail
dest="${1:?usage: debian_pic_sources.sh DEST}"
cache="${NPCD_CACHE:-$HOME/.cache/npcd}/debian-src"
mkdir -p "$dest" "$cache"

for entry in abseil:libabsl-dev protobuf:libprotobuf-dev re2:libre2-dev; do
    src="${entry%%:*}" dev="${entry#*:}"
    version="$(dpkg-query -W -f='${source:Version}' "$dev" 2>/dev/null)" ||
        { echo "debian_pic_sources: $dev is not installed (apt-get install $dev)" >&2; exit 1; }
    dir="$cache/$src-$version"
    if [ ! -d "$dir" ]; then
        tmp="$(mktemp -d "$cache/.fetch-XXXXXX")"
        if ! (cd "$tmp" && apt-get source -q "$src=$version" >/dev/null 2>"$tmp/log"); then
            echo "debian_pic_sources: apt-get source $src=$version failed:" >&2
            tail -5 "$tmp/log" >&2
            echo "  (the apt sources need deb-src entries for this release; see cpp_client/README.md)" >&2
            rm -rf "$tmp"
            exit 1
        fi
        unpacked="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -1)"
        mv "$unpacked" "$dir"
        rm -rf "$tmp"
    fi
    ln -sfn "$dir" "$dest/$src"
done
echo "$dest"
