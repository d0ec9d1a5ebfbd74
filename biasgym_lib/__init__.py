"""BiasGym book library: inject a fictional bias, trace it to heads, steer it away.

One module per stage of the method (the book's method page defines each stage):
``measure`` (chapter 1), ``inject`` (2), ``scope``, ``patching`` and ``heads`` (3), ``steer``,
``evaluate`` and ``capability`` (4), ``generalise`` (5), ``claims`` (6); beneath them
``models``, ``hooks``, ``batching``, ``tokens``, ``stats`` and ``data``; ``runs`` runs every
stage for a profile and ``cache`` keeps its results; ``cli`` and ``tools`` are the commands.
"""

__version__ = "0.1.0"
