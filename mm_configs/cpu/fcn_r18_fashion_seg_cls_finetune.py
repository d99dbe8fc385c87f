# Step (c) of the chain, segmentation: FCN R-18-D16 on Fashion-MNIST scenes (CPU), its backbone starting from
# the folded mmpretrain classifier of resnet18_fashion_cls_dyrep.py. No DyRepHook.
#
# The classifier's backbone is mmpretrain's ResNet-18 (one 7x7 stem conv); mmseg's FCN configs use
# ResNetV1c (a three-conv deep stem), whose stem cannot take those weights. mmseg's `ResNet` is the same
# network as mmpretrain's (same parameter names and shapes): with it every backbone weight loads, none
# missing or unexpected. Dilation and strides as in fcn_r18_fashion_seg.py (output stride 16).
#
# First train resnet18_fashion_cls_dyrep.py (it writes work_dir/dyrep_deploy.pth), then
# (DYREP_CLS_CKPT overrides the checkpoint path, DYREP_FASHION_SEG the data folder):
#     dyrep-fx train mm_configs/cpu/fcn_r18_fashion_seg_cls_finetune.py
_base_ = ['./fcn_r18_fashion_seg.py']

work_dir = 'work_dirs/fcn_r18_fashion_seg_cls_finetune'
cls_checkpoint = '{{$DYREP_CLS_CKPT:work_dirs/resnet18_fashion_cls_dyrep/dyrep_deploy.pth}}'
model = dict(
    backbone=dict(
        type='ResNet',
        # The folded file holds the whole classifier: prefix='backbone.' picks the backbone's weights.
        init_cfg=dict(type='Pretrained', checkpoint=cls_checkpoint, prefix='backbone.')))

max_iters = 200
train_cfg = dict(max_iters=max_iters, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=20, end=max_iters, by_epoch=False),
]
