# RetinaNet R-18-FPN trained from scratch on a CPU, on real aerial images: the tree crowns hand-annotated in
# deepforest 2.1.0's data (NEON imagery; 400x400 tiles, one class "tree"). The plain baseline that the
# DyRep config (retinanet_r18_fpn_deepforest_dyrep.py) extends; its folded checkpoints load into this model.
#
# Data, once (reads the installed package, no download; `pip install --no-deps deepforest==2.1.0`):
#     python -c "from dyrep_fx_examples.datasets import deepforest_coco; deepforest_coco('data/deepforest_coco')"
# Train (no mim or tools/train.py needed; DYREP_DEEPFOREST overrides the data folder):
#     dyrep-fx train mm_configs/cpu/retinanet_r18_fpn_deepforest.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/retinanet_r18_fpn_deepforest.py')).train())
_base_ = ['mmdet::retinanet/retinanet_r18_fpn_1x_coco.py']

data_root = '{{$DYREP_DEEPFOREST:data/deepforest_coco}}/'
work_dir = 'work_dirs/retinanet_r18_fpn_deepforest'
classes = ('tree', )
image_scale = (320, 320)  # 400x400 tiles -> 320x320: crowns of ~30 px, the size of the smallest anchors

model = dict(
    # From scratch (no ImageNet download): nothing frozen, BatchNorm statistics are trained.
    backbone=dict(init_cfg=None, frozen_stages=-1, norm_eval=False),
    # A narrower FPN and head than COCO's (256 channels, 4 convs) so that a CPU iteration takes ~1 s.
    neck=dict(out_channels=128),
    bbox_head=dict(num_classes=1, in_channels=128, feat_channels=128, stacked_convs=2),
    test_cfg=dict(score_thr=0.05, max_per_img=150))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=[0.25, 0.25], direction=['horizontal', 'vertical']),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=image_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes, palette=[(0, 200, 0)]),
        ann_file='train.json',
        data_prefix=dict(img='images/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=data_root,
        metainfo=dict(classes=classes, palette=[(0, 200, 0)]),
        ann_file='val.json',
        data_prefix=dict(img='images/'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='CocoMetric', ann_file=data_root + 'val.json', metric='bbox')
test_evaluator = val_evaluator

max_iters = 300
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=100)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=50),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[200, 270], gamma=0.1),
]
# norm_decay_mult=0: no weight decay on norm weights/biases (DyRepHook gives the branch scales the same).
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001),
    clip_grad=dict(max_norm=35, norm_type=2),
    paramwise_cfg=dict(norm_decay_mult=0.0))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=100, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
