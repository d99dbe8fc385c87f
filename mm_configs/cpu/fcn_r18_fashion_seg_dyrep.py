# FCN R-18-D16 from scratch on Fashion-MNIST scenes (CPU) + DyRep on the backbone: fcn_r18_fashion_seg.py with
# only the DyRepHook added.
#
# Data, once (Fashion-MNIST from Debian's dataset-fashion-mnist package; no download):
#     python -c "from dyrep_fx_examples.datasets import fashion_mnist_segmentation as f; f('data/fashion_seg', 400)"
# Train (no mim or tools/train.py needed; DYREP_FASHION_SEG overrides the data folder):
#     dyrep-fx train mm_configs/cpu/fcn_r18_fashion_seg_dyrep.py
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/cpu/fcn_r18_fashion_seg_dyrep.py')).train())
# work_dir/dyrep_deploy.pth (written at the end) is the folded segmentor: it loads with strict=True into
# fcn_r18_fashion_seg.py.
_base_ = ['./fcn_r18_fashion_seg.py']

work_dir = 'work_dirs/fcn_r18_fashion_seg_dyrep'
custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep grows every 5 of 120 epochs until epoch 100; over these 400 iterations: a step every 20 iterations
# until iteration 320 (80%), i.e. 16 growth steps of one conv each.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone'],
         dyrep=dict(interval=20, until=320, topk=1, mode='online')),
]
