"""fewstep's ComfyUI nodes: copy or link this folder into ComfyUI/custom_nodes/ (fewstep installed in ComfyUI's
Python, or this folder linked from a fewstep checkout). Nodes: "fewstep schedule (sigmas)" (FewstepSigmas) and
"fewstep sampler" (FewstepSampler); see docs/integrations.md."""

import sys
from pathlib import Path

try:
    import fewstep  # noqa: F401
except ImportError:  # linked from a checkout whose package is not installed: use the checkout's src/
    src = Path(__file__).resolve().parent.parent / "src"
    if not (src / "fewstep" / "__init__.py").is_file():
        raise ImportError("the fewstep ComfyUI nodes need the fewstep package in ComfyUI's Python: "
                          "pip install fewstep (or link this folder from a fewstep checkout)") from None
    sys.path.insert(0, str(src))

from fewstep.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
