"""System A world: exact m-heights of real linear codes and the dataset builder (see examples/mheight_moe.py)."""
