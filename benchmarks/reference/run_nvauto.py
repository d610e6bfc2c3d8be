"""Reference NVAUTO run for the benchmark (files in -> DWI-grid mask file out), with MONAI 0.9.0.

* ``--exact``: runs DeepISLES' own ``src/NVAUTO/process.py`` unchanged (``ThresholdModel(...).process()``,
  which hard-codes the 15 official models and CUDA); needs all 15 ``model{k}.ts`` and a GPU.
* otherwise (CPU, or a subset of the models): the same steps as ``process.py``'s ``predict`` and
  ``process_isles_case``, with the same transforms, arguments and order (LoadImaged [ADC, DWI],
  EnsureChannelFirstd, CastToTyped, EnsureTyped, Spacingd 1 mm bilinear, NormalizeIntensityd nonzero
  channel-wise; SlidingWindowInferer 192x192x128, overlap 0.625, gaussian, sw_batch_size 2; per model
  torch.jit.load, autocast, softmax, Invertd; mean; argmax; SimpleITK write with the DWI geometry) but on
  the device given and with the models given. This is the code path of the parity fixtures
  (scripts/make_official_fixtures_nvauto.md).

usage: python run_nvauto.py --input DIR (holding dwi/dwi.nii.gz, adc/adc.nii.gz) --weights WEIGHTS_DIR
                            [--models N] [--device cpu|cuda] [--exact --deepisles-src SRC]
output: DIR/output/nvauto/lesion_msk.nii.gz
"""
import argparse
import os
import runpy
import sys
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", type=Path, required=True)
    ap.add_argument("--weights", type=Path, required=True, help="folder holding NVAUTO/ts/model*.ts")
    ap.add_argument("--models", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--deepisles-src", type=Path)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exact:
        script = args.deepisles_src / "NVAUTO" / "process.py"
        sys.argv = [str(script), "--input_path", str(args.input), "--model_path", str(args.weights)]
        runpy.run_path(str(script), run_name="__main__")
        return

    import numpy as np
    import SimpleITK
    from monai import data, transforms
    from monai.data.utils import decollate_batch
    from monai.inferers import SlidingWindowInferer

    dev = torch.device(args.device)
    dwi_path, adc_path = str(args.input / "dwi" / "dwi.nii.gz"), str(args.input / "adc" / "adc.nii.gz")
    dwi_image = SimpleITK.ReadImage(dwi_path)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
        torch.backends.cudnn.benchmark = True
    load_keys = ["image"]
    val_transform = transforms.Compose([
        transforms.LoadImaged(keys=load_keys),
        transforms.EnsureChannelFirstd(keys=load_keys),
        transforms.CastToTyped(keys=["image"], dtype=np.float32),
        transforms.EnsureTyped(keys=load_keys, data_type="tensor"),
        transforms.Spacingd(keys=["image"], pixdim=[1, 1, 1], mode=["bilinear"]),
        transforms.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
    ])
    val_ds = data.Dataset(data=[{"image": [adc_path, dwi_path]}], transform=val_transform)
    val_loader = data.DataLoader(val_ds, batch_size=1, shuffle=False, num_workers=0, sampler=None)
    checkpoints = [os.path.join(args.weights, f"NVAUTO/ts/model{k}.ts") for k in range(args.models)]
    model_inferer = SlidingWindowInferer(roi_size=[192, 192, 128], overlap=0.625, mode="gaussian",
                                         cache_roi_weight_map=True, sw_batch_size=2)
    with torch.no_grad():
        for batch_data in val_loader:
            image = batch_data["image"].to(dev)
            all_probs = []
            for checkpoint in checkpoints:
                model = torch.jit.load(checkpoint)
                model.to(dev)
                model.eval()
                with torch.cuda.amp.autocast(enabled=True):
                    logits = model_inferer(inputs=image, network=model)
                probs = torch.softmax(logits.float(), dim=1)
                batch_data["pred"] = probs
                inverter = transforms.Invertd(keys="pred", transform=val_transform, orig_keys="image",
                                              meta_keys="pred_meta_dict", nearest_interp=False, to_tensor=True)
                probs = [inverter(x)["pred"] for x in decollate_batch(batch_data)]
                probs = torch.stack(probs, dim=0)
                all_probs.append(probs.cpu())
            probs = sum(all_probs) / len(all_probs)
            labels = torch.argmax(probs, dim=1).cpu().numpy().astype(np.int8)
            prediction = labels[0].copy()
    prediction = prediction.transpose((2, 1, 0)).astype(int)
    out = SimpleITK.GetImageFromArray(prediction.astype(np.uint8))
    out.SetOrigin(dwi_image.GetOrigin()), out.SetSpacing(dwi_image.GetSpacing())
    out.SetDirection(dwi_image.GetDirection())
    (args.input / "output" / "nvauto").mkdir(parents=True, exist_ok=True)
    SimpleITK.WriteImage(out, str(args.input / "output" / "nvauto" / "lesion_msk.nii.gz"))


if __name__ == "__main__":
    main()
