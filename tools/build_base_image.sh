#!/usr/bin/env bash
# Build a local Python base image from Debian packages, for machines that cannot pull images.
#
# debootstrap makes a minimal Debian bookworm root (python3 3.11 + venv), a virtual environment at
# /opt/venv goes first on PATH (so `python`/`pip` work like in python:3.11-slim), and the tarred
# root is imported into podman as IMAGE. Then build the CPU variant of the Dockerfile on it:
#   tools/build_base_image.sh localhost/debian-python:3.11-bookworm
#   podman build --build-arg BASE_IMAGE=localhost/debian-python:3.11-bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0 -t mmoe-ds:cpu .
# Needs root, debootstrap, podman and a Debian mirror (MIRROR).
set -euo pipefail

IMAGE="${1:-localhost/debian-python:3.11-bookworm}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
WORK="${WORK:-$(mktemp -d)}"
ROOTFS="$WORK/rootfs"

for tool in debootstrap podman tar; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; install it (apt-get install -y $tool)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root; run with sudo" >&2; exit 2; }

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR"
fi
chroot "$ROOTFS" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin

tar -C "$ROOTFS" -c . | podman import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$IMAGE"
podman run --rm "$IMAGE" python -c "import sys, ssl; print('base image OK:', sys.version.split()[0], sys.prefix)"
