# ResNet-18 from scratch on Fashion-MNIST items (CPU, mmpretrain) + DyRep on the backbone:
# resnet18_fashion_cls.py with only the DyRepHook added. Step (a) of the pretrain -> fold -> fine-tune chain
# (mm_configs/README.md).
#
# Data, once (Fashion-MNIST from Debian's dataset-fashion-mnist package; no download):
#     python -c "from dyrep_fx_examples.datasets import fashion_mnist_classification as f; f('data/fashion_cls', 4000, 500)"
# Train (no mim or tools/train.py needed; DYREP_FASHION_CLS overrides the data folder):
#     dyrep-fx train mm_configs/cpu/resnet18_fashion_cls_dyrep.py
# work_dir/dyrep_deploy.pth (written at the end) is the folded classifier, a plain ResNet-18 again: it loads
# with strict=True into resnet18_fashion_cls.py (step b), and retinanet_r18_fpn_deepforest_cls_finetune.py /
# fcn_r18_fashion_seg_cls_finetune.py start their backbones from it (step c). An intermediate checkpoint
# folds with `dyrep-fx fold mm_configs/cpu/resnet18_fashion_cls_dyrep.py iter_250.pth -o deploy.pth`.
_base_ = ['./resnet18_fashion_cls.py']

work_dir = 'work_dirs/resnet18_fashion_cls_dyrep'
custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep grows every 5 of 120 epochs until epoch 100; over these 500 iterations: a step every 25 iterations
# until iteration 400 (80%), i.e. 16 growth steps of one conv each. Only the backbone holds convs: the
# GlobalAveragePooling neck and the LinearClsHead have none, and listing them is refused before training.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone'],
         dyrep=dict(interval=25, until=400, topk=1, mode='online')),
]
