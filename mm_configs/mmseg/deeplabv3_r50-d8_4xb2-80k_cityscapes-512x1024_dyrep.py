# DeepLabV3 R-50-D8, 80k iterations on Cityscapes 512x1024 (mmseg's shipped config, unchanged) + DyRep on the
# backbone.
#
# Train (Cityscapes under data/cityscapes/, as mmseg expects; no mim or tools/train.py needed):
#     dyrep-fx train mm_configs/mmseg/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py
#     torchrun --nproc_per_node 8 -m dyrep_fx.cli train mm_configs/mmseg/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py --launcher pytorch  # 8 GPUs
# (in Python: Runner.from_cfg(Config.fromfile('mm_configs/mmseg/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py')).train(), with cfg.work_dir set)
# (or mmseg's tools/train.py from a source checkout; SyncBN needs a distributed launch, single-process runs
# fall back to BN). At the end DyRepHook writes work_dir/dyrep_deploy.pth, the folded model, which loads
# with strict=True into mmseg's own deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py. Fold an intermediate
# checkpoint with
#     dyrep-fx fold mm_configs/mmseg/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024_dyrep.py iter_N.pth -o deploy.pth
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py']

custom_imports = dict(imports=['dyrep_fx.mm'], allow_failed_imports=False)
# DyRep's ImageNet schedule (Huang et al., CVPR 2022) grows the most salient conv every 5 of 120 epochs and
# stops growing at epoch 100: 20 growth steps, each after 1/24 of training, none in the last ~17%.
# Scaled to this 80k-iteration schedule (4 GPUs x 2 images): a step every 3200 iterations until iteration
# 64000 (80% of training), i.e. the same 20 steps. As in the detection configs the heads stay as shipped;
# the decode head traces too, so targets=['backbone', 'decode_head'] also works.
custom_hooks = [
    dict(type='DyRepHook', targets=['backbone'],
         dyrep=dict(interval=3200, until=64000, topk=1, mode='online')),
]
