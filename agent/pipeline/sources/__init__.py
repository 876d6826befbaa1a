"""Where frames come from: video files and network streams (video), an upstream tracker's frames and tracks
(upstream), the embedded demo clip (demo).
"""
