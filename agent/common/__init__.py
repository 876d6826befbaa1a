"""Small helpers every layer of the runtime and engines/ may use: the cache folder (atomic writes, locks,
sha256), what an FR model expects (FRSpec, preprocessing), image reading, CURVE key files, a progress bar.
Nothing here imports from the rest of `agent`.
"""
