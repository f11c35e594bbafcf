"""The package's optional parts and what they need: a plain ``pip install marl-operator`` is the
operator alone, and the offline tools and the demo come with extras. Importing a part whose
extra is missing fails at once with the command that installs it, rather than with the first
``No module named`` deep in an import chain. (Here because ``policies`` is the package every
part imports and needs no extra.)"""

from __future__ import annotations

import importlib.util

_TRAIN = ("torch", "tqdm", "matplotlib", "gymnasium", "pettingzoo", "tensorboard")
EXTRAS: dict[str, tuple[str, ...]] = {"train": _TRAIN, "demo": ("kmock", *_TRAIN)}
"""Extra -> the modules of its distributions (pyproject.toml's optional dependencies; the
demo's include the training extra's)."""


def require_extra(extra: str, part: str) -> None:
    """ImportError naming ``part``, the missing modules and the fix, unless ``extra``'s
    modules can all be imported."""
    missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
    if missing:
        torch_first = "pip install torch==2.13.0 && " if "torch" in missing else ""
        raise ImportError(
            f"{part} needs the package's [{extra}] extra (missing: {', '.join(missing)}): "
            f"{torch_first}pip install 'marl-operator[{extra}]' (from a checkout: pip install "
            f"-e '.[{extra}]')"
        )
