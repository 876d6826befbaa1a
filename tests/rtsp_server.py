"""A real RTSP server on loopback for the tests: GStreamer's GstRtspServer serving one H.264 mp4 file.

Run it with the system Python (python3-gi + gir1.2-gst-rtsp-server-1.0; see tests/setup_system.sh), not the venv:

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --path cam --file clip.mp4 [--loop]

The H.264 track is demuxed and re-payloaded, not re-encoded (`filesrc ! qtdemux ! h264parse ! rtph264pay`), so it
costs next to no CPU. The factory is not shared: every client gets its own pipeline and the file from its first frame.
With --loop the file restarts at its end (segment seeks: timestamps keep increasing; a file whose video starts late,
like short_hamilton_clip.mp4's 0.85 s empty edit, shows that gap again at each restart); without it the stream ends
with the file. Prints READY on stdout once the server is listening on 127.0.0.1:PORT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

log = logging.getLogger("rtsp_server")


def _seek_to_start(pad: Gst.Pad, flags: Gst.SeekFlags) -> None:
    pad.push_event(Gst.Event.new_seek(1.0, Gst.Format.TIME, flags | Gst.SeekFlags.SEGMENT, Gst.SeekType.SET, 0,
                                      Gst.SeekType.NONE, -1))


def _loop(media: GstRtspServer.RTSPMedia) -> None:
    """Play the file as a segment and, at the segment's end, seek back to its start without flushing: a loop whose
    timestamps keep increasing. The server's own seek on PLAY (ffmpeg sends a Range) is turned into a segment seek."""
    pad = media.get_element().get_by_name("parse").get_static_pad("sink")

    def as_segment_seek(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        event = info.get_event()
        if event.type != Gst.EventType.SEEK:
            return Gst.PadProbeReturn.OK
        rate, fmt, flags, start_type, start, stop_type, stop = event.parse_seek()
        if flags & Gst.SeekFlags.SEGMENT:
            return Gst.PadProbeReturn.OK
        seek = Gst.Event.new_seek(rate, fmt, flags | Gst.SeekFlags.SEGMENT, start_type, start, stop_type, stop)
        seek.set_seqnum(event.get_seqnum())
        pad.push_event(seek)
        return Gst.PadProbeReturn.DROP

    def restart(_media: GstRtspServer.RTSPMedia, _message: Gst.Message) -> bool:
        log.info("end of file: looping")
        _seek_to_start(pad, Gst.SeekFlags.NONE)
        return True

    pad.add_probe(Gst.PadProbeType.EVENT_UPSTREAM, as_segment_seek)
    media.connect("prepared", lambda _m: _seek_to_start(pad, Gst.SeekFlags.FLUSH))
    media.connect("handle-message::segment-done", restart)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", default="stream", help="mount point: rtsp://127.0.0.1:PORT/PATH")
    ap.add_argument("--file", type=Path, required=True, help="an mp4 file with an H.264 video track")
    ap.add_argument("--loop", action="store_true", help="restart the file at its end")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s rtsp_server %(levelname)s %(message)s")
    if not args.file.is_file():
        sys.exit(f"no such file: {args.file}")

    Gst.init(None)
    server = GstRtspServer.RTSPServer(address="127.0.0.1", service=str(args.port))
    factory = GstRtspServer.RTSPMediaFactory(shared=False)
    location = str(args.file.resolve()).replace('"', '\\"')
    factory.set_launch(f'( filesrc location="{location}" ! qtdemux ! h264parse name=parse config-interval=-1 '
                       f"! rtph264pay name=pay0 pt=96 )")
    if args.loop:
        factory.connect("media-configure", lambda _f, media: _loop(media))
    server.get_mount_points().add_factory("/" + args.path.strip("/"), factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")

    loop = GLib.MainLoop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    log.info("serving %s at rtsp://127.0.0.1:%d/%s%s", args.file, args.port, args.path.strip("/"),
             " (looping)" if args.loop else "")
    print("READY", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
