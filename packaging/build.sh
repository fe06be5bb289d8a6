#!/usr/bin/env bash
# Builds inletd's packages from this tree:
#   target/debian/inletd_<version>-1_<arch>.deb      (cargo deb)
#   target/generate-rpm/inletd-<version>-1.<arch>.rpm (cargo generate-rpm)
# Steps: the release binary; the man pages and shell completions rendered
# from the CLI definitions (`inletd generate-assets`) into target/assets;
# a stripped copy of the binary for the rpm; then both packagers, which
# read [package.metadata.deb] and [package.metadata.generate-rpm] in
# Cargo.toml. Needs cargo-deb, cargo-generate-rpm, gzip and strip
# (binutils); scripts/package-test.sh installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every missing tool at once, each with how to get it.
missing=()
for pair in "cargo-deb:cargo install cargo-deb --locked" \
    "cargo-generate-rpm:cargo install cargo-generate-rpm --locked" \
    "gzip:apt-get install gzip" "strip:apt-get install binutils"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair%%:*} (${pair#*:})")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "packaging/build.sh: missing tools:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    exit 1
fi

target_dir=${CARGO_TARGET_DIR:-target}
bin="$target_dir/release/inletd"

echo "== cargo build --release"
cargo build --release --bin inletd

echo "== man pages and completions into target/assets"
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions target/assets/generated
"$bin" generate-assets target/assets/generated >/dev/null
for page in target/assets/generated/*.1; do
    gzip -9n -c "$page" >"target/assets/man/$(basename "$page").gz"
done
for completion in inletd.bash _inletd inletd.fish; do
    cp "target/assets/generated/$completion" target/assets/completions/
done
cp "$bin" target/assets/inletd
strip target/assets/inletd

echo "== cargo deb"
rm -f target/debian/inletd_*.deb
cargo deb --no-build --strip --output target/debian/

echo "== cargo generate-rpm"
mkdir -p target/generate-rpm
rm -f target/generate-rpm/inletd-*.rpm
cargo generate-rpm --output target/generate-rpm

ls -l target/debian/inletd_*.deb target/generate-rpm/inletd-*.rpm
