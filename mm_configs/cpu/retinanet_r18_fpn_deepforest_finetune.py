# Fine-tune RetinaNet R-18-FPN on deepforest's aerial tree crowns (CPU), its backbone starting from a folded
# DyRep checkpoint (plain ResNet-18 weights: DyRep's branches are folded away). No DyRepHook.
#
# First train retinanet_r18_fpn_deepforest_dyrep.py (it writes work_dir/dyrep_deploy.pth), or fold one of
# its checkpoints:
#     dyrep-fx fold mm_configs/cpu/retinanet_r18_fpn_deepforest_dyrep.py iter_300.pth -o deploy.pth
# Then (DYREP_BACKBONE_CKPT overrides the checkpoint path, DYREP_DEEPFOREST the data folder):
#     dyrep-fx train mm_configs/cpu/retinanet_r18_fpn_deepforest_finetune.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/retinanet_r18_fpn_deepforest_finetune.py')).train())
# (To start the whole detector, FPN and head too, from the folded file, set load_from=<it> instead.)
_base_ = ['./retinanet_r18_fpn_deepforest.py']

work_dir = 'work_dirs/retinanet_r18_fpn_deepforest_finetune'
backbone_checkpoint = '{{$DYREP_BACKBONE_CKPT:work_dirs/retinanet_r18_fpn_deepforest_dyrep/dyrep_deploy.pth}}'
model = dict(
    backbone=dict(
        # The folded file holds the whole detector ({'state_dict': {'backbone.conv1.weight': ...}}):
        # prefix='backbone.' picks the backbone's weights.
        init_cfg=dict(_delete_=True, type='Pretrained', checkpoint=backbone_checkpoint, prefix='backbone.'),
        # Usual fine-tuning of a pretrained backbone: stem and stage 1 frozen, BN statistics kept.
        frozen_stages=1,
        norm_eval=True))

max_iters = 200
train_cfg = dict(max_iters=max_iters, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[150], gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr=0.005))
