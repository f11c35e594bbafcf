"""The offline side: the vectorised simulator, training, evaluation and the adaptation loop.
They need the package's [train] extra."""

from policies.extras import require_extra

require_extra("train", "marl-operator's simulator")
