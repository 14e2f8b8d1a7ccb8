#!/usr/bin/env bash
# Commits the staged Unity package as the root of the `upm` branch, the branch Unity's Package
# Manager installs from a git URL (…/npcd.git#upm), and tags it upm-VERSION (…#upm-0.1.0 pins it).
#
#   scripts/publish_upm.sh [PACKAGE_DIR]   (default: build/clients/unity/com.npcd.client, from
#                                           scripts/build_clients.sh or `make clients`)
#
# The working tree, the index and the checked-out branch are left alone: the commit is written
# with a temporary index. Each run adds a commit on top of the branch's last (the history of
# releases stays), none when the package did not change. Push it yourself:
#   git push origin upm upm-VERSION
# UPM_REPO names another repository to commit into (default: this one).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
pkg="$(cd "${1:-$root/build/clients/unity/com.npcd.client}" && pwd)"
repo="${UPM_REPO:-$root}"
branch="${UPM_BRANCH:-upm}"
[ -f "$pkg/package.json" ] || { echo "publish_upm: $pkg/package.json missing: run scripts/build_clients.sh first" >&2; exit 1; }
[ -f "$pkg/Plugins/Linux/x86_64/libnpcd_client.so" ] || { echo "publish_upm: $pkg has no native library" >&2; exit 1; }
version="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$pkg/package.json")"

index="$(mktemp)"
trap 'rm -f "$index"' EXIT
rm -f "$index"  # git makes a new index where none is; an empty file is not one
# -f: the package holds files this repository ignores (the built library).
GIT_INDEX_FILE="$index" git -C "$repo" --work-tree="$pkg" add -A -f .
tree="$(GIT_INDEX_FILE="$index" git -C "$repo" write-tree)"
parent="$(git -C "$repo" rev-parse -q --verify "refs/heads/$branch" || true)"
if [ -n "$parent" ] && [ "$(git -C "$repo" rev-parse "$parent^{tree}")" = "$tree" ]; then
    echo "publish_upm: $branch already holds this package ($version)"
    exit 0
fi
source_rev="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
commit="$(GIT_AUTHOR_NAME="${GIT_AUTHOR_NAME:-npcd release}" GIT_AUTHOR_EMAIL="${GIT_AUTHOR_EMAIL:-release@npcd.invalid}" \
          GIT_COMMITTER_NAME="${GIT_COMMITTER_NAME:-npcd release}" GIT_COMMITTER_EMAIL="${GIT_COMMITTER_EMAIL:-release@npcd.invalid}" \
          git -C "$repo" commit-tree "$tree" ${parent:+-p "$parent"} -m "com.npcd.client $version (built from $source_rev)")"
git -C "$repo" update-ref "refs/heads/$branch" "$commit"
git -C "$repo" tag -f "$branch-$version" "$commit" >/dev/null
echo "publish_upm: $branch and $branch-$version at $commit (com.npcd.client $version)"
