# Step (c) of the chain, detection: RetinaNet R-18-FPN on deepforest's aerial tree crowns (CPU), its backbone
# starting from the folded mmpretrain classifier of resnet18_fashion_cls_dyrep.py (a plain ResNet-18:
# DyRep's branches are folded away; mmpretrain's and mmdet's ResNet-18 share parameter names and shapes,
# so every backbone weight loads, none missing or unexpected). No DyRepHook.
#
# First train resnet18_fashion_cls_dyrep.py (it writes work_dir/dyrep_deploy.pth), then
# (DYREP_CLS_CKPT overrides the checkpoint path, DYREP_DEEPFOREST the data folder):
#     dyrep-fx train mm_configs/cpu/retinanet_r18_fpn_deepforest_cls_finetune.py
# Stem and stage 1 frozen, BatchNorm statistics kept (retinanet_r18_fpn_deepforest_finetune.py's settings).
_base_ = ['./retinanet_r18_fpn_deepforest_finetune.py']

work_dir = 'work_dirs/retinanet_r18_fpn_deepforest_cls_finetune'
cls_checkpoint = '{{$DYREP_CLS_CKPT:work_dirs/resnet18_fashion_cls_dyrep/dyrep_deploy.pth}}'
# The folded file holds the whole classifier ({'state_dict': {'backbone.conv1.weight': ..., 'head.fc...'}}):
# prefix='backbone.' picks the backbone's weights.
model = dict(backbone=dict(init_cfg=dict(checkpoint=cls_checkpoint)))
