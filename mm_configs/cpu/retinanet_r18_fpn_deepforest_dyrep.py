# RetinaNet R-18-FPN from scratch on deepforest's aerial tree crowns (CPU) + DyRep on the backbone, the FPN
# and the head: retinanet_r18_fpn_deepforest.py with only the DyRepHook added. The head's convs are shared by
# the five pyramid levels (mmdet's multi_apply, which torch.fx cannot trace): they are sites all the same,
# their calls counted at run time on one real batch; each grows as one block serving every level.
#
# Data, once (`pip install --no-deps deepforest==2.1.0`, then):
#     python -c "from dyrep_fx_examples.datasets import deepforest_coco; deepforest_coco('data/deepforest_coco')"
# Train (no mim or tools/train.py needed; DYREP_DEEPFOREST overrides the data folder):
#     dyrep-fx train mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py')).train())
# work_dir/dyrep_deploy.pth (written at the end) is the folded detector: it loads with strict=True into
# retinanet_r18_fpn_deepforest.py, and retinanet_r18_fpn_deepforest_finetune.py starts its backbone from it.
_base_ = ['./retinanet_r18_fpn_deepforest.py']

work_dir = 'work_dirs/retinanet_r18_fpn_deepforest_dyrep'
custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep grows every 5 of 120 epochs until epoch 100; over these 300 iterations: a step every 25 iterations
# until iteration 240 (80%), i.e. 9 growth steps of one conv each.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone', 'neck', 'bbox_head'],
         dyrep=dict(interval=25, until=240, topk=1, mode='online')),
]
