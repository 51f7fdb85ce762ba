#!/usr/bin/env bash
# Builds Tern's container images from this checkout's release binaries, with no
# registry and no base image: each image is FROM scratch with a root
# filesystem staged here (the stripped binaries, the few glibc libraries they
# link, /etc/passwd with the non-root users), so `docker build` needs nothing
# from the network.
#
#   docker/build-images.sh                    # tern/proxy, tern/init, tern/control, tern/demo
#   docker/build-images.sh --no-cargo         # reuse target/release as it is
#   docker/build-images.sh --profile debug    # from target/debug (the e2e tests use the
#                                             # binaries the suite already built)
#
# Images are tagged :<workspace version> and :latest. Sizes are printed last.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
profile=release
cargo=yes
while [[ $# -gt 0 ]]; do
    case $1 in
        --no-cargo) cargo=no ;;
        --profile) profile=${2:?--profile needs release or debug}; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case $profile in
    release) flag=--release ;;
    debug) flag= ;;
    *) echo "--profile is release or debug, not $profile" >&2; exit 2 ;;
esac
stage="$repo/target/images/$profile"
bin="$repo/target/$profile"

if [[ $cargo == yes ]]; then
    cargo build $flag -p tern-proxy -p tern-control -p tern-init -p tern-demo -p ternctl
fi

# Copies a program and every shared library it links (as ldd resolves them on
# this machine) into a root filesystem.
add_program() {
    local root=$1 program=$2 dest=$3
    install -D -m 0755 "$program" "$root$dest"
    strip --strip-all "$root$dest" 2>/dev/null || true
    ldd "$program" | awk '/=> \//{print $3} /^[ \t]*\/lib/{print $1}' | while read -r lib; do
        local real
        real=$(readlink -f "$lib")
        install -D -m 0755 "$real" "$root$lib"
    done
}

# A root filesystem with /etc/passwd naming the users the images run as.
new_root() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root/etc" "$root/tmp" "$root/usr/local/bin"
    chmod 1777 "$root/tmp"
    cat >"$root/etc/passwd" <<PASSWD
root:x:0:0:root:/:/sbin/nologin
tern-proxy:x:2102:2102:tern-proxy:/:/sbin/nologin
tern:x:2103:2103:tern:/:/sbin/nologin
nobody:x:65534:65534:nobody:/:/sbin/nologin
PASSWD
    cat >"$root/etc/group" <<GROUP
root:x:0:
tern-proxy:x:2102:
tern:x:2103:
nogroup:x:65534:
GROUP
    # glibc's resolver reads these; the engine bind-mounts its own resolv.conf.
    echo "hosts: files dns" >"$root/etc/nsswitch.conf"
}

build() {
    local name=$1
    local log="$stage/$name.build.log"
    if ! docker build -t "tern/$name:$version" -t "tern/$name:latest" \
        -f "$repo/docker/$name.Dockerfile" "$stage/$name" >"$log" 2>&1; then
        cat "$log" >&2
        echo "docker build of tern/$name failed" >&2
        exit 1
    fi
    echo "built tern/$name:$version"
}

new_root "$stage/proxy/rootfs"
add_program "$stage/proxy/rootfs" "$bin/tern-proxy" /usr/local/bin/tern-proxy
build proxy

# tern-control, and ternctl for minting bootstrap tokens beside it (the
# Compose deployment's token jobs run it from this image). /var/lib/tern is
# the state directory: the CA and the token key, owned by tern-control's user.
new_root "$stage/control/rootfs"
add_program "$stage/control/rootfs" "$bin/tern-control" /usr/local/bin/tern-control
add_program "$stage/control/rootfs" "$bin/ternctl" /usr/local/bin/ternctl
mkdir -p "$stage/control/state"
build control

new_root "$stage/demo/rootfs"
for b in pay order loadgen; do
    add_program "$stage/demo/rootfs" "$bin/$b" "/usr/local/bin/$b"
done
build demo

# The init image also carries iptables (nft and legacy back ends) and its
# extension modules, which tern-init runs to install the redirects; and
# tern-pause, which holds a pod's network namespace.
root="$stage/init/rootfs"
new_root "$root"
add_program "$root" "$bin/tern-init" /usr/local/bin/tern-init
add_program "$root" "$bin/tern-pause" /usr/local/bin/tern-pause
for multi in xtables-nft-multi xtables-legacy-multi; do
    add_program "$root" "$(command -v $multi || echo /usr/sbin/$multi)" "/usr/sbin/$multi"
done
for link in iptables-nft iptables-nft-save iptables-nft-restore ip6tables-nft ip6tables-nft-save ip6tables-nft-restore; do
    ln -sf xtables-nft-multi "$root/usr/sbin/$link"
done
for link in iptables-legacy iptables-legacy-save iptables-legacy-restore ip6tables-legacy ip6tables-legacy-save ip6tables-legacy-restore; do
    ln -sf xtables-legacy-multi "$root/usr/sbin/$link"
done
# The plain names use the nft back end, as Debian's alternatives do by default.
for t in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
    ln -sf "$(echo "$t" | sed 's/^\(ip6\?tables\)/\1-nft/')" "$root/usr/sbin/$t"
done
xt=/usr/lib/x86_64-linux-gnu/xtables
mkdir -p "$root$xt"
cp -a "$xt/." "$root$xt/"
for module in "$xt"/*.so; do
    ldd "$module" | awk '/=> \//{print $3}' | while read -r lib; do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
done
mkdir -p "$root/run" "$root/var/lib"
build init

echo
docker images --format 'table {{.Repository}}:{{.Tag}}\t{{.Size}}' | grep -E "^tern/.*:$version"
