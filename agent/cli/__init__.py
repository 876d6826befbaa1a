"""The `bestshot` command: one sub-command per job; score, bench and subscribe have modules of their own.
"""
