"""Make a COPY of the reference packages run on NumPy 2 and Python 3.12 (what the GPU machine has).

DeepISLES pins NumPy 1.x. A few NumPy 1 spellings that NumPy 2 removed appear in MONAI 0.9.0, PyTorch
Lightning 1.6.5 and torchmetrics 0.9.3; this rewrites them to their NumPy 2 equivalents, which compute the
same numbers (``a.ptp(axis)`` -> ``np.ptp(a, axis)``, ``np.Inf`` -> ``np.inf``, ``np.product`` -> ``np.prod``,
``np.float_`` -> ``np.float64``, NumPy-integer seeds taken modulo 2**32 as Python ints). Run on a copied site folder, never on an installed environment.

usage: python numpy2_compat.py SITE_DIR [SITE_DIR ...]
"""
import re
import sys
from pathlib import Path

RULES = [
    (re.compile(r"\b([A-Za-z_][A-Za-z0-9_]*)\.ptp\(axis=1\)"), r"np.ptp(\1, axis=1)"),
    (re.compile(r"\bnp\.Inf\b"), "np.inf"),
    (re.compile(r"\bnp\.product\("), "np.prod("),
    (re.compile(r"\bnp\.float_\b"), "np.float64"),
    # NEP 50: np.uint32 % (2**32) overflows under NumPy 2; as Python ints it is the same value
    (re.compile(r"_seed = _seed % MAX_SEED"), "_seed = int(_seed) % MAX_SEED"),
    (re.compile(r"seed=seed % MAX_SEED"), "seed=int(seed) % MAX_SEED"),
    # Python 3.12 removed FileFinder.find_module; MONAI 0.9.0 re-loads each submodule it has just imported
    # with it (later MONAI versions dropped the line): keep the import, skip the redundant re-load
    (re.compile(r"importer\.find_module\(name\)\.load_module\(name\)  # type: ignore"),
     "pass  # Python 3.12: find_module is gone; the module was imported on the line above"),
]


def main():
    changed = 0
    for root in sys.argv[1:]:
        for path in Path(root).rglob("*.py"):
            text = path.read_text(errors="replace")
            new = text
            for pat, rep in RULES:
                new = pat.sub(rep, new)
            if new != text:
                path.write_text(new)
                changed += 1
                print("patched", path)
    print(f"{changed} file(s) patched")


if __name__ == "__main__":
    main()
