"""Where best shots go: the fan-out every output plugs into (base); ZeroMQ PUB/PUSH with CURVE (zeromq), NATS
JetStream (nats) and MQTT (mqtt); the on-disk spool (spool); the rule every output follows before faces leave the
machine (exposure: encrypted, loopback, or explicitly allowed in clear).
"""
