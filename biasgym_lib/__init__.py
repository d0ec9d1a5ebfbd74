"""BiasGym book library: inject a fictional bias, trace it to heads, steer it away.

One module per stage of the method (see METHOD.md): ``models`` (loading and the
architecture adapter), ``data``, ``inject``, ``measure``, ``scope``, ``steer``,
``evaluate``, ``plots``, ``widgets``, ``cli``.
"""

__version__ = "0.1.0"
