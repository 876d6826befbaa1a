"""Where best shots go: ZeroMQ PUB/PUSH with CURVE (zeromq) and its on-disk spool (spool); the rule every output
follows before faces leave the machine (exposure: encrypted, loopback, or explicitly allowed in clear).
"""
