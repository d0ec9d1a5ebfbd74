"""Tooling that is not taught: building the book (:mod:`.bookbuild`) and the benchmark
(:mod:`.bench`). They use only the public functions of the stage modules."""
