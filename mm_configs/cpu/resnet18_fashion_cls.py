# ResNet-18 (mmpretrain's ImageNet ResNet: 7x7 stem, max-pool, four stages) trained from scratch on a CPU to
# classify real Fashion-MNIST items (10 classes), upscaled to 64 x 64 RGB. The plain baseline that
# resnet18_fashion_cls_dyrep.py extends; its folded checkpoints load into this model with strict=True.
# The backbone is the same ResNet-18 as mmdet's and mmseg's `ResNet` (same parameter names and shapes), so
# a folded classifier starts detectors and segmentors: see the *_cls_finetune.py configs.
#
# Data, once (Fashion-MNIST from Debian's dataset-fashion-mnist package; no download):
#     python -c "from dyrep_fx_examples.datasets import fashion_mnist_classification as f; f('data/fashion_cls', 4000, 500)"
# Train (no mim or tools/train.py needed; DYREP_FASHION_CLS overrides the data folder):
#     dyrep-fx train mm_configs/cpu/resnet18_fashion_cls.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/resnet18_fashion_cls.py')).train())
_base_ = ['mmpretrain::resnet/resnet18_8xb32_in1k.py']

data_root = '{{$DYREP_FASHION_CLS:data/fashion_cls}}/'
work_dir = 'work_dirs/resnet18_fashion_cls'
image_size = 64  # 28 x 28 items upscaled: 2 x 2 maps at stage 4 (output stride 32)
classes = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
           'Ankle boot')

model = dict(head=dict(num_classes=len(classes)))
data_preprocessor = dict(num_classes=len(classes))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=image_size, crop_ratio_range=(0.6, 1.0)),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size)),
    dict(type='PackInputs'),
]
# mmpretrain's CustomDataset: class folders of PNG files listed with their labels in meta/<split>.txt.
train_dataloader = dict(
    batch_size=32,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/train.txt',
        data_prefix='train',
        metainfo=dict(classes=classes),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=64,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        _delete_=True,
        type='CustomDataset',
        data_root=data_root,
        ann_file='meta/val.txt',
        data_prefix='val',
        metainfo=dict(classes=classes),
        pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_evaluator = val_evaluator

max_iters = 500
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=250)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=25),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=max_iters, eta_min=1e-4),
]
# norm_decay_mult=0: no weight decay on norm weights/biases (DyRepHook gives the branch scales the same).
optim_wrapper = dict(
    optimizer=dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=0.0001),
    paramwise_cfg=dict(norm_decay_mult=0.0))
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=25, log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=250, max_keep_ckpts=2))
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
