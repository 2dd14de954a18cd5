"""Where the real data sets live: an explicit root, an environment variable, or ``../shared/data``."""

from __future__ import annotations

import os
from pathlib import Path

from he2st.io._common import MissingFileError

#: The repository root when he2st runs from a source checkout (src layout).
_REPO = Path(__file__).resolve().parents[3]


def resolve_root(name: str, root: str | os.PathLike | None, env: str, marker: str) -> Path:
    """Folder of data set ``name``.

    Order: ``root``; ``$<env>``; ``$HE2ST_SHARED_DATA/<name>``; ``../shared/data/<name>``
    relative to the working directory, then to the repository. The folder must
    contain ``marker``.

    Parameters
    ----------
    name
        Name of the data set (its folder name under the shared data folder).
    root
        Folder given by the user; when set, it is the only candidate.
    env
        Environment variable that may name the folder.
    marker
        File or folder that the data set's folder must contain.

    Returns
    -------
    pathlib.Path
        The first candidate that contains ``marker``.

    Raises
    ------
    MissingFileError
        No candidate exists; the message lists every place looked at.
    """
    if root is not None:
        candidates = [Path(root)]
    else:
        candidates = []
        if os.environ.get(env):
            candidates.append(Path(os.environ[env]))
        if os.environ.get("HE2ST_SHARED_DATA"):
            candidates.append(Path(os.environ["HE2ST_SHARED_DATA"]) / name)
        candidates += [Path.cwd().parent / "shared" / "data" / name, _REPO.parent / "shared" / "data" / name]
    for cand in candidates:
        if (cand / marker).exists():
            return cand
    tried = ", ".join(repr(str(c)) for c in dict.fromkeys(candidates))
    raise MissingFileError(
        f"data set {name!r} not found: no {marker!r} in {tried}. "
        f"Pass root= or set ${env} to the folder that holds it."
    )
