"""Helpers of the FNO stability shootout (examples/fno_shootout.py): the grid-lines simulator."""
