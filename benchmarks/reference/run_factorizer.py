"""Reference FACTORIZER run for the benchmark (files in -> DWI-grid mask file out), with DeepISLES' vendored
factorizer 0.0.1, MONAI 0.9.0 and PyTorch Lightning.

* ``--exact``: runs DeepISLES' own ``src/FACTORIZER/process.py`` (``Factorizer(...).process()`` ->
  ``predict.predict``, which hard-codes the 10 official checkpoints, runs on cuda:0 when there is one, and
  leaves the models in training mode as DeepISLES does). Only ``SimpleITK.Elastix`` (FLAIR -> DWI
  registration; SimpleElastix is not in the SimpleITK wheels) is replaced by the identity: the FLAIR given
  is already on the DWI grid.
* otherwise (a subset of the checkpoints): ``predict.predict``'s steps, in order and with the same
  arguments, on the listed checkpoints (the FLAIR is not registered, see above), then the same SimpleITK
  write as ``process.py``.

usage: python run_factorizer.py --input DIR (dwi/dwi.nii.gz, adc/adc.nii.gz, flair/flair.nii.gz)
                                --weights WEIGHTS_DIR [--ckpt REL ...] [--exact] --deepisles-src SRC
output: DIR/output/factorizer/lesion_msk.nii.gz
"""
import argparse
import os
import runpy
import sys
from pathlib import Path

os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch 1.11 (DeepISLES) loaded full pickles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True, help="folder holding FACTORIZER/logs/...")
    ap.add_argument("--ckpt", nargs="*", default=[], help="checkpoint paths relative to WEIGHTS/FACTORIZER")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--deepisles-src", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import SimpleITK as sitk
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    sitk.Elastix = lambda fixed, moving, *a, **k: moving  # FLAIR already on the DWI grid (see docstring)
    fdir = args.deepisles_src / "FACTORIZER"
    sys.path[:0] = [str(fdir / "model" / "factorizer"), str(fdir)]
    if args.exact:
        script = fdir / "process.py"
        sys.argv = [str(script), "--input_path", str(args.input), "--model_path", str(args.weights)]
        runpy.run_path(str(script), run_name="__main__")
        return

    import factorizer as ft
    import numpy as np
    import predict as P  # DeepISLES src/FACTORIZER/predict.py (seed_everything(42), device at import)
    from monai import transforms

    def read(name):
        return sitk.ReadImage(str(args.input / name / f"{name}.nii.gz"))

    dwi, adc, flair = read("dwi"), read("adc"), read("flair")
    flair = sitk.Elastix(dwi, flair)
    data_properties = {"test": [{"input": [dwi, adc, flair]}]}
    dm = ft.ISLESDataModule(data_properties=data_properties, spacing=[2.0, 2.0, 2.0], spatial_size=[64, 64, 64],
                            num_workers=0, cache_num=1, cache_rate=1.0, batch_size=1, seed=42)
    dm.test_transform = transforms.Compose([
        P.LoadFromSimpleITKd("input"),
        transforms.NormalizeIntensityd("input", nonzero=True, channel_wise=True),
        transforms.ToTensord("input"),
    ])
    dm.setup("test")
    base = os.path.join(args.weights, "FACTORIZER")
    models = [ft.SemanticSegmentation.load_from_checkpoint(os.path.join(base, c)) for c in args.ckpt]
    network = (ft.Ensemble, {"models": models, "weights": [0.1] * len(models)})
    inferer = ft.ISLESInferer(spacing=[2.0, 2.0, 2.0], spatial_size=[64, 64, 64], overlap=0.5, post="class")
    model = ft.SemanticSegmentation(network=network, inferer=inferer, loss=(None,), metrics={}).to(P.device)
    with torch.no_grad():
        batch = [*dm.test_dataloader()][0]
        batch["input"] = batch["input"].to(P.device)
        pred = model.inferer.get_postprocessed(batch, model)
    pred["input"] = pred["input"].to("cpu")
    prediction = ft.decollate_batch(pred)[0]["input"][0].T.numpy().astype(int)
    out = sitk.GetImageFromArray(prediction.astype(np.uint8))
    out.SetOrigin(dwi.GetOrigin()), out.SetSpacing(dwi.GetSpacing()), out.SetDirection(dwi.GetDirection())
    (args.input / "output" / "factorizer").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out, str(args.input / "output" / "factorizer" / "lesion_msk.nii.gz"))


if __name__ == "__main__":
    main()
