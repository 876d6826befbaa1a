#!/usr/bin/env bash
# System packages the tests need (a real RTSP server, systemd-analyze). Idempotent; skips what is present.
set -euo pipefail
need=()
command -v gst-launch-1.0 >/dev/null || need+=(gstreamer1.0-tools)
/usr/bin/python3 -c "import gi; gi.require_version('GstRtspServer', '1.0')" 2>/dev/null || \
  need+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-rtsp gstreamer1.0-plugins-good \
         gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav)
command -v systemd-analyze >/dev/null || need+=(systemd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "tests/setup_system.sh: missing ${need[*]} (not root: tests that need them will skip)" >&2
  fi
fi
