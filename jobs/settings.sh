# Published settings of Segmenter and ALGM, selected by $SETTING (sourced by the sbatch scripts).
# Each sets DATASET_NAME, BACKBONE, RUN (the log folder name) and REDUCTION (token-reduction flags).
# GPUs used for the published runs are given in jobs/README.md; the world batch size must divide by them.

case "${SETTING:?set SETTING, e.g. SETTING=ade20k_s_algm (see jobs/README.md)}" in
  ade20k_ti_pure)    DATASET_NAME=ade20k;         BACKBONE=vit_tiny_patch16_384;  REDUCTION="--patch-type pure" ;;
  ade20k_ti_algm)    DATASET_NAME=ade20k;         BACKBONE=vit_tiny_patch16_384;  REDUCTION="--patch-type algm --selected-layers 1 5 --merging-window-size 2 2 --threshold 0.90" ;;
  ade20k_s_pure)     DATASET_NAME=ade20k;         BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type pure" ;;
  ade20k_s_algm)     DATASET_NAME=ade20k;         BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type algm --selected-layers 1 5 --merging-window-size 2 2 --threshold 0.88" ;;
  ade20k_b_pure)     DATASET_NAME=ade20k;         BACKBONE=vit_base_patch16_384;  REDUCTION="--patch-type pure" ;;
  ade20k_b_algm)     DATASET_NAME=ade20k;         BACKBONE=vit_base_patch16_384;  REDUCTION="--patch-type algm --selected-layers 1 5 --merging-window-size 2 2 --threshold 0.94" ;;
  ade20k_l_pure)     DATASET_NAME=ade20k_large;   BACKBONE=vit_large_patch16_384; REDUCTION="--patch-type pure" ;;
  ade20k_l_algm)     DATASET_NAME=ade20k_large;   BACKBONE=vit_large_patch16_384; REDUCTION="--patch-type algm --selected-layers 1 7 --merging-window-size 2 2 --threshold 0.95" ;;
  pcontext_s_pure)   DATASET_NAME=pascal_context; BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type pure" ;;
  pcontext_s_algm)   DATASET_NAME=pascal_context; BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type algm --selected-layers 1 5 --merging-window-size 2 2 --threshold 0.88" ;;
  cityscapes_s_pure) DATASET_NAME=cityscapes;     BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type pure" ;;
  cityscapes_s_algm) DATASET_NAME=cityscapes;     BACKBONE=vit_small_patch16_384; REDUCTION="--patch-type algm --selected-layers 1 5 --merging-window-size 2 2 --threshold 0.955" ;;
  *) echo "unknown SETTING '$SETTING' (see jobs/README.md)" >&2; exit 2 ;;
esac
RUN="${RUN:-$SETTING}"
MODEL_DIR="${OUT:?set OUT to the folder that holds the runs}/$RUN"
