# RetinaNet R-50-FPN, 1x COCO (mmdet's shipped config, unchanged) + DyRep on the backbone and the FPN.
#
# Train (COCO under data/coco/, as mmdet expects; no mim or tools/train.py needed):
#     dyrep-fx train mm_configs/mmdet/retinanet_r50_fpn_1x_coco_dyrep.py
#     torchrun --nproc_per_node 8 -m dyrep_fx.cli train mm_configs/mmdet/retinanet_r50_fpn_1x_coco_dyrep.py --launcher pytorch  # 8 GPUs
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/mmdet/retinanet_r50_fpn_1x_coco_dyrep.py')).train(), with cfg.work_dir set)
# (or mmdet's tools/train.py from a source checkout: `python tools/train.py mm_configs/mmdet/...`).
# At the end DyRepHook writes work_dir/dyrep_deploy.pth: the folded model, which loads with strict=True into
# mmdet's own retinanet_r50_fpn_1x_coco.py (e.g. as `load_from=`). Fold an intermediate checkpoint with
#     dyrep-fx fold mm_configs/mmdet/retinanet_r50_fpn_1x_coco_dyrep.py work_dirs/.../iter_N.pth -o deploy.pth
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep's ImageNet schedule (Huang et al., CVPR 2022) grows the most salient conv every 5 of 120 epochs and
# stops growing at epoch 100: 20 growth steps, each after 1/24 of training, none in the last ~17%.
# Scaled to this 1x schedule (12 epochs x 7330 iterations at 8 GPUs x 2 images = ~88k iterations): a step
# every 3500 iterations until iteration 70000 (80% of training), i.e. the same 20 steps. The iterations
# count runner iterations, so with another total batch size scale `interval` and `until` with the schedule.
# The frozen stem and stage 1 (frozen_stages=1) never grow; the rest of the backbone, the FPN convs and the
# head's convs can (each head conv serves the five pyramid levels as one block).
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone', 'neck', 'bbox_head'],
         dyrep=dict(interval=3500, until=70000, topk=1, mode='online')),
]
