"""Side-by-side benchmarks of safeclip: `python -m bench [--quick] [--only NAME,...] [--out DIR]`.

Every performance figure the README quotes comes from a run of this package; see bench/README.md.
"""
