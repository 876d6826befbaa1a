#!/usr/bin/env bash
# System packages the tests need (a real RTSP server, systemd-analyze, NATS and MQTT servers, a headless Chromium). Idempotent; skips what is present.
# tests/rtsp_server.py runs on the system python3: GstRtspServer (gir1.2-gst-rtsp-server-1.0, python3-gi) with
# filesrc + qtdemux + rtph264pay (plugins-good) + h264parse (plugins-bad); it re-payloads H.264, so no codecs.
set -euo pipefail
need=()
command -v gst-inspect-1.0 >/dev/null || need+=(gstreamer1.0-tools)
/usr/bin/python3 - 2>/dev/null <<'EOF' || need+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad)
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
assert all(Gst.ElementFactory.find(e) for e in ("filesrc", "qtdemux", "h264parse", "rtph264pay"))
EOF
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || need+=(nats-server)  # JetStream cluster tests
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)  # MQTT output tests
command -v chromium >/dev/null && command -v chromedriver >/dev/null || need+=(chromium chromium-driver)  # live page tests (Selenium)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "tests/setup_system.sh: missing ${need[*]} (not root: tests that need them will skip, which fails a CI run: tests/skip_guard.py)" >&2
  fi
fi
