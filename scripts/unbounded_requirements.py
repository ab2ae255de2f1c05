"""The names of deltaw's dependencies (runtime and the dev extra) without their version bounds, for `make test-latest`.

    python scripts/unbounded_requirements.py              # one name per line: pip install --upgrade $(...)
    python scripts/unbounded_requirements.py --versions   # the versions this environment resolved them to

torch is left out: it stays at the locked version (an unpinned torch pulls several GB of CUDA wheels).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
KEPT_AT_LOCK = {"torch"}


def dependency_names() -> list[str]:
    """Every requirement of [project.dependencies] and the dev extra, as a bare distribution name."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    names = [re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0] for requirement in requirements]
    return [name for name in names if name not in KEPT_AT_LOCK]


def main() -> None:
    if sys.argv[1:] == ["--versions"]:
        for name in sorted([*dependency_names(), *KEPT_AT_LOCK, "tokenizers", "huggingface-hub"]):
            print(f"{name}=={metadata.version(name)}")
        return
    print("\n".join(dependency_names()))


if __name__ == "__main__":
    main()
