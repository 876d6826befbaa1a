"""The agent as a service: YAML configuration, the process and its signals, metrics and health, systemd notify.
"""
