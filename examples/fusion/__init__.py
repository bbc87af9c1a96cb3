"""FusionNet v2 world: grid environment, operation tables, annealing teacher (see examples/fusion_ddp.py)."""
