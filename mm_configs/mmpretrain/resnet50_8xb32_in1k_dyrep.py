# ResNet-50 on ImageNet-1k with DyRep in DyRep's own setting (Huang et al., CVPR 2022; the authors'
# `configs/strategies/DyRep/resnet.yaml`): 8 GPUs x 32 images, SGD lr 0.1, momentum 0.9, weight decay 1e-4,
# 120 epochs of cosine decay, colour jitter 0.06; DyRep grows the most salient conv every 5 epochs and stops
# growing at epoch 100. It inherits mmpretrain's resnet50_8xb32_in1k.py (100 epochs, steps at 30/60/90),
# whose model, data and runtime are kept; only the schedule, the jitter and the hook change.
#
# Train (ImageNet under data/imagenet/, as mmpretrain expects; no mim or tools/train.py needed):
#     torchrun --nproc_per_node 8 -m dyrep_fx.cli train mm_configs/mmpretrain/resnet50_8xb32_in1k_dyrep.py --launcher pytorch
# (one GPU: `dyrep-fx train CONFIG --auto-scale-lr` scales the lr to the batch of 32.)
# At the end DyRepHook writes work_dir/dyrep_deploy.pth: the folded model, a plain ResNet-50, which loads
# with strict=True into mmpretrain's own resnet50_8xb32_in1k.py, and whose backbone starts mmdet / mmseg
# ResNet-50 models (init_cfg=dict(type='Pretrained', checkpoint=..., prefix='backbone.')).
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']

custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
max_epochs = 120
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=1)
param_scheduler = dict(_delete_=True, type='CosineAnnealingLR', T_max=max_epochs, by_epoch=True, begin=0,
                       end=max_epochs, eta_min=1e-7, convert_to_iter_based=True)
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=224),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='ColorJitter', brightness=0.06, contrast=0.06, saturation=0.06),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
# Epochs, as the paper counts them: 20 growth steps, none in the last 20 epochs. DyRep's saliency is read
# over the whole interval; each step grows one conv (topk=1), then cuts branches that stopped mattering.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone'], by_epoch=True,
         dyrep=dict(interval=5, until=100, topk=1, mode='online')),
]
