"""What a twin is, without importing onnx: the pruning recipe and the names the shared-trunk pair graph uses.

The agent reads these on every start; onnx (about a second to import) is needed only to prepare models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_RECIPE_RE = re.compile(
    r"^(?P<kind>2:4|unstructured)(?::(?P<ratio>[0-9.]+))?(?:@(?P<lo>[0-9.]+)-(?P<hi>[0-9.]+))?"
    r"(?:/(?P<pattern>.+))?$"
)


@dataclass(frozen=True)
class Recipe:
    """Which layers to prune and how. Written as text: `KIND[:RATIO][@LO-HI][/REGEX]`.

    Examples: `2:4@0.75-1` (2:4 on the deepest quarter of eligible layers), `unstructured:0.4`
    (global magnitude pruning of 40 % of all eligible weights), `2:4/Block8` (layers whose name
    matches the regex). `criterion` "magnitude" ranks by |w|; "activation" by |w| times the input
    channel's activation norm on calibration faces (needs `channel_scale` when pruning).
    """

    kind: str = "2:4"
    ratio: float = 0.5
    depth: tuple[float, float] = (0.0, 1.0)
    pattern: str | None = None
    criterion: str = "magnitude"
    per_layer: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def parse(cls, text: str) -> Recipe:
        text = text.strip()
        criterion = "magnitude"
        if text.endswith("+act"):
            text, criterion = text[: -len("+act")], "activation"
        m = _RECIPE_RE.match(text)
        if not m:
            raise ValueError(
                f"bad pruning recipe {text!r}: expected KIND[:RATIO][@LO-HI][/REGEX][+act], "
                "e.g. '2:4@0.75-1' or 'unstructured:0.4'"
            )
        kind = m["kind"]
        if kind == "2:4" and m["ratio"]:
            raise ValueError(f"bad pruning recipe {text!r}: 2:4 prunes exactly half of each group, no ratio")
        ratio = float(m["ratio"]) if m["ratio"] else (0.5 if kind == "2:4" else 0.4)
        lo = float(m["lo"]) if m["lo"] else 0.0
        hi = float(m["hi"]) if m["hi"] else 1.0
        if not (0.0 <= ratio < 1.0) or not (0.0 <= lo < hi <= 1.0):
            raise ValueError(f"bad pruning recipe {text!r}: need 0 <= ratio < 1 and 0 <= LO < HI <= 1")
        if m["pattern"]:
            try:
                re.compile(m["pattern"])
            except re.error as e:
                raise ValueError(f"bad pruning recipe {text!r}: layer pattern {m['pattern']!r}: {e}") from None
        return cls(kind=kind, ratio=ratio, depth=(lo, hi), pattern=m["pattern"], criterion=criterion)

    def __str__(self) -> str:
        s = self.kind if self.kind == "2:4" else f"{self.kind}:{self.ratio:g}"
        if self.depth != (0.0, 1.0):
            s += f"@{self.depth[0]:g}-{self.depth[1]:g}"
        if self.pattern:
            s += f"/{self.pattern}"
        if self.criterion == "activation":
            s += "+act"
        return s

    @property
    def slug(self) -> str:
        """The recipe as a file-name-safe string."""
        return re.sub(r"[^A-Za-z0-9.+-]+", "_", str(self))


TWIN = "twin/"
# Relative depths (in Conv order) whose input activations the pair reports; for FaceNet the outputs of
# Conv2d_4b_3x3 and Mixed_6a, chosen on the tuning split (docs/QUALITY.md, "Selection score").
STAT_DEPTHS = (0.05, 0.34)
STATS = "stats/"
