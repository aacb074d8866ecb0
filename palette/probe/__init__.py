"""Per-layer sensitivity: probe inputs (`inputs`), the passes over the model (`passes`), the
sketch algebra (`sketch`), the fast and exhaustive estimators (`fast`, `exhaustive`) behind
`probe_sensitivity` (`run`), the `Sensitivity` result and its file (`sensitivity`), the disk cache
(`cache`), and measuring a recipe on a probe set (`measure`)."""

from .inputs import PROMPTS, ProbeSet, make_probe_set
from .measure import Measurement, measure
from .run import probe_sensitivity
from .sensitivity import Cost, LayerInfo, Sensitivity

__all__ = ["PROMPTS", "Cost", "LayerInfo", "Measurement", "ProbeSet", "Sensitivity", "make_probe_set",
           "measure", "probe_sensitivity"]
