"""XEC world: the 4760-sensor detector geometry and a synthetic point-source event generator.

Used by examples/xec_mae.py.
"""
