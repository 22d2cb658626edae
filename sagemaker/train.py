"""SageMaker training entry point: runs the mhist_nb pipeline on the `training` channel.

SageMaker sets SM_CHANNEL_TRAINING (the MHIST copy), SM_MODEL_DIR (uploaded as the model artefact: checkpoints and
prediction files) and SM_OUTPUT_DATA_DIR (uploaded as output: executed notebooks and HTML); hyper-parameters arrive in
SM_HPS: `params` (default params/mhist_gpu.yaml) and dotted overrides such as `11_train_vit.lr_full`.
"""
import sys
from mhist_nb.pipeline import sagemaker_main

if __name__ == '__main__': sys.exit(sagemaker_main())
