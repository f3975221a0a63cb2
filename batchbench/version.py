"""Versions: of the package, and of the code that measures.

``MEASUREMENT_VERSION`` is part of every trial's and throughput point's identity.
Bump it whenever a change alters what a recorded number means or how it is
measured (timing windows, what a step contains, data order, eval placement, the
optimizer's arithmetic): a rerun on an old workdir then re-measures instead of
silently reusing rows measured by other code, and the report warns when rows of
several versions are mixed.
"""

__version__ = "0.2.0"

# 1: issues 1-5 (per-trial timing). 2: a throughput phase per sweep point, LR and seed as
# runtime values of one compiled program, stateful workloads with per-step RNG. 3: the
# noise scale's norms at every gns.every_steps-th step only, groups in shard_map. 4: the
# steps between measured ones are the plain step (no shard_map, no switch), and the
# default split of one device's batch is 2 groups.
MEASUREMENT_VERSION = 4
