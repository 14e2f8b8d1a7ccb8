#!/usr/bin/env bash
# Builds the game clients on Linux, and stages the engine packages.
#
#   scripts/build_clients.sh [BUILD_DIR [DIST_DIR]]      (default: build/clients, no DIST_DIR)
#
# BUILD_DIR/native/      the C++ core: libnpcd_client.so and the C test binary (CMake, ctest)
# BUILD_DIR/csharp/      Npcd.dll (the shared C# binding) and ClientTest.exe (mono test program)
# BUILD_DIR/unity/com.npcd.client/   the UPM package: unity_client/ + the binding + the library
# BUILD_DIR/godot/addons/npcd/       the Godot addon: godot_client/addons/npcd + the binding + the library
# BUILD_DIR/unreal/NpcdClient/       the Unreal plugin: unreal_client/ + the C header + the library
#
# With DIST_DIR (`make clients` passes dist/), the staged packages are also packed there, ready to ship:
# DIST_DIR/com.npcd.client-VERSION.tgz    the Unity package, an npm-pack tarball (package/...), which Unity's
#                                         Package Manager installs with "Add package from tarball"
# DIST_DIR/npcd-godot-VERSION.zip         the Godot addon (addons/npcd/...), unzipped into a project's root
# DIST_DIR/unreal/NpcdClient/             the Unreal plugin folder, copied into a project's Plugins/
#
# The C# sources live once, in csharp/Npcd; the staged packages get copies, made here.
# Needs cmake, a C/C++ compiler, grpc++ and protobuf (with protoc and grpc_cpp_plugin), Debian's
# deb-src entries for the self-contained library, and mcs for the C# part. Windows and macOS
# builds: see cpp_client/README.md.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$(mkdir -p "${1:-$root/build/clients}" && cd "${1:-$root/build/clients}" && pwd)"
dist="${2:+$(mkdir -p "$2" && cd "$2" && pwd)}"
jobs="$(nproc 2>/dev/null || echo 2)"

echo "== native library"
# Self-contained by default (only libc, libm and the loader needed at run time; cpp_client/README.md).
# NPCD_CLIENT_LINK=system links the system's shared grpc++ instead: quicker to build, not shippable.
native_args=(-DCMAKE_BUILD_TYPE=Release)
if [ "${NPCD_CLIENT_LINK:-self-contained}" = self-contained ]; then
    native_args+=(-DNPCD_CLIENT_SELF_CONTAINED=ON
                  "-DNPCD_PIC_SOURCE_DIR=$("$root/cpp_client/cmake/debian_pic_sources.sh" "$out/pic-sources")")
fi
cmake -S "$root/cpp_client" -B "$out/native" "${native_args[@]}" >/dev/null
cmake --build "$out/native" -j "$jobs"
lib="$out/native/libnpcd_client.so"

echo "== C# binding"
mkdir -p "$out/csharp"
mcs -langversion:7.2 -target:library -out:"$out/csharp/Npcd.dll" "$root"/csharp/Npcd/*.cs
mcs -langversion:7.2 -r:"$out/csharp/Npcd.dll" -out:"$out/csharp/ClientTest.exe" "$root/csharp/tests/ClientTest.cs"

# Unity ignores files without a .meta in an immutable (git) package: give every staged file
# and folder one, with a GUID derived from its path so that rebuilds keep it stable.
add_unity_metas() {
    local pkg="$1" rel guid
    (cd "$pkg" && find . -mindepth 1 ! -name '*.meta' ! -name '.*' | sort) | while read -r rel; do
        rel="${rel#./}"
        [ -e "$pkg/$rel.meta" ] && continue
        case "$rel" in Samples~*|Documentation~*) continue ;; esac
        guid="$(printf 'com.npcd.client/%s' "$rel" | md5sum | cut -c1-32)"
        printf 'fileFormatVersion: 2\nguid: %s\n' "$guid" > "$pkg/$rel.meta"
    done
}

echo "== Unity package"
unity="$out/unity/com.npcd.client"
rm -rf "$unity" && mkdir -p "$unity"
cp -R "$root/unity_client/." "$unity/"
mkdir -p "$unity/Runtime/Binding" "$unity/Plugins/Linux/x86_64"
cp "$root"/csharp/Npcd/*.cs "$unity/Runtime/Binding/"
cp "$lib" "$unity/Plugins/Linux/x86_64/libnpcd_client.so"
cp "$root/LICENSE" "$unity/LICENSE.md"
add_unity_metas "$unity"

echo "== Godot addon"
godot="$out/godot/addons/npcd"
rm -rf "$out/godot" && mkdir -p "$godot"
cp -R "$root/godot_client/addons/npcd/." "$godot/"
mkdir -p "$godot/binding" "$godot/bin/linux-x64"
cp "$root"/csharp/Npcd/*.cs "$godot/binding/"
cp "$lib" "$godot/bin/linux-x64/libnpcd_client.so"
cp "$root/LICENSE" "$godot/LICENSE"

echo "== Unreal plugin"
unreal="$out/unreal/NpcdClient"
rm -rf "$unreal" && mkdir -p "$unreal"
cp -R "$root/unreal_client/." "$unreal/"
mkdir -p "$unreal/ThirdParty/npcd_client/include" "$unreal/ThirdParty/npcd_client/lib/Linux"
cp "$root/cpp_client/include/npcd_client.h" "$unreal/ThirdParty/npcd_client/include/"
cp "$lib" "$unreal/ThirdParty/npcd_client/lib/Linux/libnpcd_client.so"
cp "$root/LICENSE" "$unreal/LICENSE"

echo "built into $out"
[ -n "$dist" ] || exit 0

echo "== packages"
# The packages' versions are checked against pyproject.toml's by tests/clients; the file names take Unity's.
version="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' "$unity/package.json")"
# Reproducible archives: sorted names, one owner, the last commit's time (or the epoch outside git).
stamp="@$(git -C "$root" log -1 --format=%ct 2>/dev/null || echo 0)"
tar_args=(--sort=name --owner=0 --group=0 --numeric-owner --mtime="$stamp" --format=gnu)
unity_tgz="$dist/com.npcd.client-$version.tgz"
tar "${tar_args[@]}" -czf "$unity_tgz" -C "$out/unity" --transform 's,^com\.npcd\.client,package,' com.npcd.client
godot_zip="$dist/npcd-godot-$version.zip"
rm -f "$godot_zip"
(cd "$out/godot" && python3 -m zipfile -c "$godot_zip" addons)
rm -rf "$dist/unreal" && mkdir -p "$dist/unreal"
cp -R "$unreal" "$dist/unreal/"
printf '%s\n' "$unity_tgz" "$godot_zip" "$dist/unreal/NpcdClient"
