"""Where best shots go: ZeroMQ PUB/PUSH with CURVE (zeromq) and its on-disk spool (spool).
"""
