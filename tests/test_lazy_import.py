"""``import blockyard`` is light and its subpackages load on first attribute access (PEP 562).

Each check runs in a fresh interpreter, so what this test process already imported cannot hide a
module that ``import blockyard`` pulls in.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SUBPACKAGES = ("blocks", "data", "losses", "train")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON object as its last line."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_blockyard_loads_no_subpackage_and_no_torch():
    out = _fresh("""
        import json, sys
        import blockyard
        heavy = sorted(m for m in sys.modules
                       if m.split('.')[0] in ('torch', 'numpy', 'einops', 'safetensors')
                       or m.startswith('blockyard.'))
        print(json.dumps({"heavy": heavy}))
    """)
    assert out["heavy"] == []


def test_subpackages_are_attributes_after_import_blockyard():
    out = _fresh("""
        import importlib, json, sys
        import blockyard
        unet = blockyard.blocks.UNet
        loaded_after_blocks = sorted(m for m in sys.modules if m.count('.') == 1 and m.startswith('blockyard.'))
        same = {name: getattr(blockyard, name) is importlib.import_module('blockyard.' + name)
                for name in ('blocks', 'data', 'losses', 'train')}
        print(json.dumps({"unet": unet.__module__ + '.' + unet.__qualname__, "after_blocks": loaded_after_blocks,
                          "same": same, "loss": blockyard.losses.dice_loss.__name__,
                          "manager": blockyard.train.CheckpointManager.__name__,
                          "store": blockyard.data.GroupedStore.__name__}))
    """)
    assert out["unet"] == "blockyard.blocks.unet.UNet"
    # touching blocks imports blocks (and what it needs), not the other subpackages
    assert out["after_blocks"] == ["blockyard.blocks"]
    assert out["same"] == dict.fromkeys(SUBPACKAGES, True)
    assert (out["loss"], out["manager"], out["store"]) == ("dice_loss", "CheckpointManager", "GroupedStore")


def test_dir_lists_the_subpackages_without_importing_them():
    out = _fresh("""
        import json, sys
        import blockyard
        print(json.dumps({"dir": dir(blockyard), "all": blockyard.__all__,
                          "loaded": sorted(m for m in sys.modules if m.startswith('blockyard.'))}))
    """)
    assert set(SUBPACKAGES) <= set(out["dir"]) and "__version__" in out["dir"]
    assert set(SUBPACKAGES) <= set(out["all"])
    assert out["loaded"] == []


def test_unknown_attribute_raises_attribute_error_naming_it():
    out = _fresh("""
        import json
        import blockyard
        try:
            blockyard.blockz
        except AttributeError as err:
            print(json.dumps({"msg": str(err), "hasattr": hasattr(blockyard, 'examples')}))
    """)
    assert "'blockz'" in out["msg"] and "blockyard" in out["msg"]
    assert out["hasattr"] is False
