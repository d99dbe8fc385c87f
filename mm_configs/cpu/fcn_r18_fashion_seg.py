# FCN R-18-D16 (ResNetV1c-18, BN, output stride 16) trained from scratch on a CPU for semantic segmentation
# of 128x128 scenes made of real Fashion-MNIST items (11 classes: background + the 10 item classes; the labels
# come from the items' own pixels).
# The plain baseline that fcn_r18_fashion_seg_dyrep.py extends; its folded checkpoints load into this model.
#
# Data, once (Fashion-MNIST from Debian's dataset-fashion-mnist package; no download):
#     python -c "from dyrep_fx_examples.datasets import fashion_mnist_segmentation as f; f('data/fashion_seg', 400)"
# Train (no mim or tools/train.py needed; DYREP_FASHION_SEG overrides the data folder):
#     dyrep-fx train mm_configs/cpu/fcn_r18_fashion_seg.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/fcn_r18_fashion_seg.py')).train())
_base_ = ['mmseg::fcn/fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py']

data_root = '{{$DYREP_FASHION_SEG:data/fashion_seg}}/'
work_dir = 'work_dirs/fcn_r18_fashion_seg'
crop_size = (128, 128)
norm_cfg = dict(type='BN', requires_grad=True)  # not SyncBN: one CPU process
num_classes = 11
metainfo = dict(
    classes=('background', 'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
             'Sneaker', 'Bag', 'Ankle boot'),
    palette=[(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
             (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)])

model = dict(
    pretrained=None,  # from scratch: no open-mmlab:// download
    data_preprocessor=dict(size=crop_size),
    # Output stride 16 (stage 4 dilated, not stages 3 and 4 as in R-18-D8): a third of D8's compute, 8 x 8
    # logits for 128 x 128 scenes of 64 x 64 cells. Nothing frozen, BatchNorm statistics trained.
    backbone=dict(strides=(1, 2, 2, 1), dilations=(1, 1, 1, 2), norm_cfg=norm_cfg, norm_eval=False,
                  frozen_stages=-1),
    decode_head=dict(num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(num_classes=num_classes, norm_cfg=norm_cfg))

dataset_type = 'BaseSegDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=crop_size, ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        metainfo=metainfo,
        img_suffix='.png',
        seg_map_suffix='.png',
        reduce_zero_label=False,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator

max_iters = 400
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=200)
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=max_iters, by_epoch=False)]
# norm_decay_mult=0: no weight decay on norm weights/biases (DyRepHook gives the branch scales the same).
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0005),
    paramwise_cfg=dict(norm_decay_mult=0.0))
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=200, max_keep_ckpts=2))
randomness = dict(seed=0)
