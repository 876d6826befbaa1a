"""Quality and its evidence: ERS (recognisability, templates), DiffProb (diverse shots, curation), and the
evaluation behind every default: EDC/pAUC on pairs, track selection, degradations, baselines, recipe tuning.
"""
