"""widthlab: how wide should this network be?

Wide & sparse families at a fixed weight count, adaptive-width layers, self-expanding networks and
the Gaussian-process kernel theory of sparse networks, with one trainer, one data layer and one report.
"""

__version__ = "0.1.0"
