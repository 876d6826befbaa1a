"""The frame's path: source -> detector -> tracker -> aligner -> gate -> scorer -> selector -> outputs.

One module per stage (sources/, detect, track, align, select (gate and selector), score, outputs/); the data
between them are the dataclasses of agent.types. runner.py holds the threads that move frames through them.
Stages import nothing from each other.
"""
