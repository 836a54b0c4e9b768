#!/bin/sh
# Make sure the server binaries the tests run are installed: NAME:PACKAGE pairs. As root on
# Debian, missing ones are installed with apt-get; otherwise the script stops naming them.
set -eu
missing=""
for pair in "$@"; do
    binary=${pair%%:*}
    package=${pair#*:}
    if ! command -v "$binary" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$binary" ]; then
        missing="$missing $package"
    fi
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing from Debian:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
else
    echo "missing:$missing (Debian: apt-get install$missing)" >&2
    exit 1
fi
