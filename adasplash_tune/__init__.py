"""adasplash-tune: AdaSplash (alpha-entmax sparse flash attention), tuned per GPU and problem.

Importing this package touches neither CUDA nor any database; the work starts at the first call.
"""

from .api import Selection, adasplash, entmax, select
from .kernels.spec import Config, ConfigError

__version__ = "0.1.0"

__all__ = ["adasplash", "entmax", "select", "Selection", "Config", "ConfigError", "__version__"]
