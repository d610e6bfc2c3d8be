#!/bin/bash
# Reference SEALS chain for the benchmark: the commands of DeepISLES' src/SEALS/nnunet_launcher.sh, in order
# and with the same arguments and environment, except: only the folds in $FOLDS (the launcher hard-codes
# 0..4), output not sent to /dev/null, and EXTRA (e.g. --disable_tta for the benchmark's --fast) appended
# to nnUNet_predict. Runs inside a copy of DeepISLES' src/SEALS (the launcher's working directory).
# usage: run_seals.sh RAW_DATA_DIR BASE_RESULTS_PATH SEALS_COPY "FOLDS" [EXTRA]
# output: RAW_DATA_DIR/output/seals/lesion_msk.nii.gz
set -e
RAW_DATA_DIR=$1; BASE_RESULTS_PATH=$2; SEALS=$3; FOLDS=$4; EXTRA=$5
cd "$SEALS"
RESULTS_FOLDER_PATH="${BASE_RESULTS_PATH}/SEALS/nnUNet_trained_models"
export nnUNet_raw_data_base="data/nnUNet_raw_data_base"
export nnUNet_preprocessed="data/nnUNet_preprocessed"
export RESULTS_FOLDER=$RESULTS_FOLDER_PATH
export nnUNet_n_proc_DA=24
python nnunet/dataset_conversion/Task500_Ischemic_Stroke_Test.py --raw_data_dir "$RAW_DATA_DIR"
for f in $FOLDS; do
  CUDA_VISIBLE_DEVICES=0 nnUNet_predict -i $nnUNet_raw_data_base/nnUNet_raw_data/Task500_Ischemic_Stroke_Test/imagesTs/ \
      -o test_result/preliminary_phase/fold$f -t 12 -tr nnUNetTrainerV2_DDP -m 3d_fullres -f $f -z \
      --overwrite_existing --disable_postprocessing $EXTRA
done
models=""
for f in $FOLDS; do
  python recover_softmax.py -i test_result -o test_result_recover/preliminary_phase/fold$f -m preliminary_phase -f fold$f --raw_data_dir $RAW_DATA_DIR
  models="$models test_result_recover/preliminary_phase/fold$f"
done
python -m ensemble_predictions -f $models -o test_ensemble/ --npz
python threshold_redirect.py -i test_ensemble/ -o ${RAW_DATA_DIR}/output/seals --raw_data_dir $RAW_DATA_DIR
